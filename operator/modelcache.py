"""Pulled model sources (hf://, s3://) of an LLMDeployment: the cache volume, the `model-pull`
init container, the revision pin, and the cache's status as the pods report it. Pure functions;
llmdeployment.py renders and applies them.

The init container runs `kvops model pull` into the cache volume before the worker starts, so
the worker's startup probe times the load only. Both containers read the source from the
`<name>-model` ConfigMap (`$(KVOPS_MODEL_SOURCE)` in their arguments): the spec's source until a
pull has resolved its revision, then the source pinned to that commit (hf://) or listing digest
(s3://). The pin changes no pod template, so no pod rolls for it; every pod created after it,
and every restarted container, pulls and loads that revision and nothing else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from kvops.operator.api import LLMDeploymentSpec
from kvops.operator.diagnosis import MODEL_PULL_CONTAINER as PULL_CONTAINER

PULLED_SCHEMES = ("hf://", "s3://")
CACHE_VOLUME = "model-cache"
CACHE_MOUNT = "/model-cache"
SOURCE_ENV = "KVOPS_MODEL_SOURCE"
SOURCE_KEY = "source"
# What `kvops model pull` logs every few seconds while it downloads (worker/models/progress.py).
PROGRESS_LINE = re.compile(
    r"^kvops: pull \S+: (?P<done>[\d.]+ [kMGT]?B) of (?P<total>[\d.]+ [kMGT]?B) "
    r"\((?P<percent>\d+)%\)(?P<rest>.*)$"
)
_UNITS = {"B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_S3_DIGEST = re.compile(r"@[0-9a-f]{40}$")


def is_pulled(source: str) -> bool:
    return source.startswith(PULLED_SCHEMES)


def unpinned(source: str) -> str:
    """The source without its revision (hf://org/name, s3://bucket/prefix)."""
    if source.startswith("hf://"):
        return source.split("@", 1)[0]
    return _S3_DIGEST.sub("", source).rstrip("/")


def config_map_name(name: str) -> str:
    return f"{name}-model"


def claim_name(name: str, spec: LLMDeploymentSpec) -> str:
    return spec.model.cache.claim_name or f"{name}-model-cache"


def pinned_source(spec: LLMDeploymentSpec, cache_status: dict[str, Any] | None) -> str:
    """The source new pods pull: pinned once a pull of the spec's source resolved a revision."""
    source = spec.model.source
    if cache_status and cache_status.get("source") == source and cache_status.get("revision"):
        return f"{unpinned(source)}@{cache_status['revision']}"
    return source


def volume_description(name: str, spec: LLMDeploymentSpec) -> str:
    if spec.model.cache.empty_dir:
        return "emptyDir"
    return f"persistentVolumeClaim/{claim_name(name, spec)}"


def cache_volume(name: str, spec: LLMDeploymentSpec) -> dict[str, Any]:
    if spec.model.cache.empty_dir:
        return {"name": CACHE_VOLUME, "emptyDir": {}}
    claim = {"claimName": claim_name(name, spec)}
    return {"name": CACHE_VOLUME, "persistentVolumeClaim": claim}


def claim_spec(spec: LLMDeploymentSpec) -> dict[str, Any] | None:
    """The spec of the per-deployment claim, None when the cache is a named claim or emptyDir."""
    cache = spec.model.cache
    if cache.claim_name or cache.empty_dir:
        return None
    claim: dict[str, Any] = {
        "accessModes": [cache.access_mode],
        "resources": {"requests": {"storage": str(cache.size)}},
    }
    if cache.storage_class_name:
        claim["storageClassName"] = cache.storage_class_name
    return claim


def source_variable(name: str) -> dict[str, Any]:
    """KVOPS_MODEL_SOURCE from the ConfigMap, read when the kubelet creates the container."""
    ref = {"name": config_map_name(name), "key": SOURCE_KEY}
    return {"name": SOURCE_ENV, "valueFrom": {"configMapKeyRef": ref}}


def endpoint_variables(spec: LLMDeploymentSpec) -> list[dict[str, Any]]:
    """HF_ENDPOINT or AWS_ENDPOINT_URL from model.endpoint (spec.env may still override it)."""
    endpoint = spec.model.endpoint
    if not endpoint or not is_pulled(spec.model.source):
        return []
    variable = "HF_ENDPOINT" if spec.model.source.startswith("hf://") else "AWS_ENDPOINT_URL"
    return [{"name": variable, "value": endpoint}]


def credentials(spec: LLMDeploymentSpec) -> list[dict[str, Any]]:
    """envFrom of the user's Secret (HF_TOKEN, AWS_ACCESS_KEY_ID, ...): referenced, never read
    by the operator, so no credential reaches an object, a log or an event."""
    if not spec.model.credentials_secret or not is_pulled(spec.model.source):
        return []
    return [{"secretRef": {"name": spec.model.credentials_secret}}]


def pull_container(
    worker: dict[str, Any], resources: dict[str, Any], mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    """`kvops model pull` with the worker's image, environment and security; the pull writes
    its JSON result or its one-line error to the termination log, which the status quotes."""
    limits = {k: v for k, v in resources.get("limits", {}).items() if k != "nvidia.com/gpu"}
    container = {
        "name": PULL_CONTAINER,
        "image": worker["image"],
        "imagePullPolicy": worker["imagePullPolicy"],
        "command": ["kvops"],
        "args": [
            "model",
            "pull",
            f"$({SOURCE_ENV})",
            "--cache",
            CACHE_MOUNT,
            "--termination-log",
            "/dev/termination-log",
        ],
        "env": worker["env"],
        "resources": {
            **({"requests": resources["requests"]} if "requests" in resources else {}),
            **({"limits": limits} if limits else {}),
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": worker["securityContext"],
        "volumeMounts": mounts,
    }
    if "envFrom" in worker:
        container["envFrom"] = worker["envFrom"]
    return container


# -------------------------------------------------------------------------------------- status


def _parse_bytes(text: str) -> int:
    number, unit = text.split()
    return int(float(number) * _UNITS[unit])


def progress_of(log: str) -> dict[str, Any] | None:
    """bytesDone and the progress line from the last progress line of a pull's log."""
    for line in reversed(log.strip().splitlines()):
        match = PROGRESS_LINE.match(line.strip())
        if match:
            return {
                "bytesDone": _parse_bytes(match["done"]),
                "progress": f"{match['done']} of {match['total']} ({match['percent']}%)"
                + match["rest"],
            }
    return None


def _pull_status(pod: dict[str, Any]) -> dict[str, Any] | None:
    statuses = (pod.get("status") or {}).get("initContainerStatuses") or []
    return next((s for s in statuses if s["name"] == PULL_CONTAINER), None)


def _result(status: dict[str, Any]) -> dict[str, Any] | None:
    terminated = (status.get("state") or {}).get("terminated") or {}
    if terminated.get("exitCode") != 0:
        return None
    try:
        result = json.loads((terminated.get("message") or "").strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    return result if isinstance(result, dict) and result.get("revision") else None


def _failure(status: dict[str, Any]) -> str | None:
    state = status.get("state") or {}
    for terminated in (state.get("terminated"), (status.get("lastState") or {}).get("terminated")):
        if terminated and terminated.get("exitCode", 0) != 0:
            message = (terminated.get("message") or "").strip().splitlines()
            return message[-1] if message else f"exited with code {terminated['exitCode']}"
    return None


def cache_status(
    name: str,
    spec: LLMDeploymentSpec,
    pods: list[dict[str, Any]],
    previous: dict[str, Any] | None,
    read_log: Callable[[str], str] | None = None,
) -> dict[str, Any] | None:
    """status.modelCache: Pending, Pulling (bytes done, from `read_log(pod_name)`, the pull's
    log tail), Ready (revision, size) or Failed (the pull's error line). A revision, once
    resolved for the spec's source, stays: it is the pin. None for sources that are not pulled."""
    source = spec.model.source
    if not is_pulled(source):
        return None
    kept = previous if previous and previous.get("source") == source else {}
    status: dict[str, Any] = {
        "source": source,
        "volume": volume_description(name, spec),
        "state": "Pending",
        "revision": kept.get("revision"),
        "bytes": kept.get("bytes"),
        "files": kept.get("files"),
        "bytesDone": None,
        "progress": None,
        "message": None,
    }
    live = [pod for pod in pods if not pod["metadata"].get("deletionTimestamp")]
    live.sort(key=lambda pod: pod["metadata"].get("creationTimestamp") or "", reverse=True)
    results, failure, pulling = [], None, None
    for pod in live:
        pulled = _pull_status(pod)
        if pulled is None:
            continue
        result = _result(pulled)
        if result is not None and unpinned(str(result.get("source", ""))) == unpinned(source):
            results.append(result)
        elif "running" in (pulled.get("state") or {}):
            pulling = pulling or pod["metadata"]["name"]
        else:
            failure = failure or _failure(pulled)
    if results:
        pinned = [r for r in results if r["revision"] == status["revision"]]
        result = (pinned or results)[0]
        status.update(
            state="Ready", revision=result["revision"], bytes=result.get("bytes"),
            files=result.get("files"),
        )  # fmt: skip
    elif kept.get("state") == "Ready" and failure is None:
        status["state"] = "Ready"  # pods gone (scaled to zero): the cache still holds it
    elif pulling is not None:
        status["state"] = "Pulling"
        status.update(progress_of(read_log(pulling) if read_log else "") or {})
    elif failure is not None:
        status.update(state="Failed", message=failure)
    return status
