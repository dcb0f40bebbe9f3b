"""PromptVersion: the status of a version (valid, content hash), its evaluation Job and the Job's
result (pure render functions first), then the handlers.

The operator never writes a PromptVersion's spec. Which version holds a label is computed from
the versions themselves (kvops.operator.prompts.label_holders) and reported in every version's
status; when a label moves, the LLMDeployments that reference the prompt re-render their prompt
ConfigMap. All reconciles of one prompt's versions are serialized by a per-prompt lock, taken
before any LLMDeployment's lock (never the reverse), so two versions never publish labels from
different snapshots.

An evaluation runs as a Job (`kvops eval` in the target LLMDeployment's image, never in the
operator's threads) once per content and evaluation: the Job is named after their hash. Its
container leaves a JSON summary as its termination message, which becomes status.lastEvaluation.
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

import kopf
import yaml

from kvops.operator import contract, diagnosis, kube, llmdeployment
from kvops.operator.api import API_VERSION, LLMDeploymentSpec, PromptVersionSpec
from kvops.operator.metrics import RESOURCE_STATUS, measured
from kvops.operator.pods import restricted_container_security, restricted_pod_security
from kvops.operator.prompts import (
    PromptLabels,
    content_hash,
    duplicate_problem,
    template_error,
    versions_of,
)

EVAL_DIR = "/etc/kvops/eval"
EVAL_FILE = "promptversion.yaml"
TERMINATION_LOG = "/dev/termination-log"
# The whole dataset's time budget; `kvops eval` bounds each request by itself.
EVAL_DEADLINE_S = 3600
# Job names are at most 63 characters: "<name prefix>-eval-<10-character hash>".
_NAME_PREFIX = 41
UID_LABEL = "kvops.io/promptversion-uid"
HASH_LABEL = "kvops.io/eval-hash"
API_KEY_ENV = "KVOPS_API_KEY"


def evaluation_hash(spec: PromptVersionSpec) -> str:
    """What an evaluation's result depends on: the content and the evaluation itself."""
    assert spec.evaluation is not None
    evaluation = spec.evaluation.model_dump(mode="json", by_alias=True)
    text = json.dumps([content_hash(spec), evaluation], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def eval_job_name(name: str, digest: str) -> str:
    """A longer name is cut and gets a hash of itself, so that two cut names never meet."""
    if len(name) > _NAME_PREFIX:
        cut = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{name[: _NAME_PREFIX - 9].rstrip('.-')}-{cut}"
    return f"{name}-eval-{digest}"


def child_labels(owner: dict[str, Any], digest: str) -> dict[str, str]:
    """Labels of the evaluation's Job, pod and ConfigMap. The owner is named by uid: its name
    (a DNS subdomain of up to 253 characters) may not fit a label value."""
    return {
        "app.kubernetes.io/name": "kvops-eval",
        **kube.MANAGED_BY,
        "kvops.io/prompt": owner["spec"]["promptName"],
        UID_LABEL: owner["metadata"]["uid"],
        HASH_LABEL: digest,
    }


def metadata(owner: dict[str, Any], name: str, digest: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner["metadata"]["namespace"],
        "labels": child_labels(owner, digest),
        "ownerReferences": [kube.owner_reference(owner)],
    }


def render_eval_config_map(owner: dict[str, Any], spec: PromptVersionSpec) -> dict[str, Any]:
    """The PromptVersion as `kvops eval` reads it; labels left out, so that the content is
    exactly what the Job's name hashes."""
    digest = evaluation_hash(spec)
    manifest = {
        "apiVersion": API_VERSION,
        "kind": "PromptVersion",
        "metadata": {"name": owner["metadata"]["name"]},
        "spec": spec.model_dump(mode="json", by_alias=True, exclude={"labels"}, exclude_none=True),
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(owner, eval_job_name(owner["metadata"]["name"], digest), digest),
        "data": {EVAL_FILE: yaml.safe_dump(manifest, sort_keys=True)},
    }


def render_eval_job(
    owner: dict[str, Any],
    spec: PromptVersionSpec,
    target: str,
    target_spec: LLMDeploymentSpec,
    endpoint: str,
) -> dict[str, Any]:
    """The Job that runs `kvops eval` in the target's image (which has `kvops`) against the
    target's HTTP endpoint, under Pod Security `restricted`."""
    digest = evaluation_hash(spec)
    name = eval_job_name(owner["metadata"]["name"], digest)
    env = [
        {"name": var.name, "valueFrom": {"secretKeyRef": var.secret_key_ref.model_dump()}}
        for var in target_spec.env
        # The worker's API key, if the target requires one (kvops serve reads the same name).
        if var.name == API_KEY_ENV and var.secret_key_ref is not None
    ]
    container: dict[str, Any] = {
        "name": "eval",
        "image": target_spec.image,
        "imagePullPolicy": target_spec.image_pull_policy,
        "command": ["kvops"],
        "args": [
            "eval",
            f"{EVAL_DIR}/{EVAL_FILE}",
            "--endpoint",
            endpoint,
            "--model",
            target_spec.model.served_name or target,
            "--termination-log",
            TERMINATION_LOG,
        ],
        # `kvops eval` writes its JSON summary (or its error) here for the operator to read.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        # `kvops eval` imports neither torch nor the Kubernetes client: about 40 MB resident.
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"memory": "512Mi"},
        },
        "securityContext": restricted_container_security(),
        "volumeMounts": [
            {"name": "promptversion", "mountPath": EVAL_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if env:
        container["env"] = env
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": restricted_pod_security(),
        "containers": [container],
        "volumes": [
            {"name": "promptversion", "configMap": {"name": name}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if target_spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s.name} for s in target_spec.image_pull_secrets]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(owner, name, digest),
        "spec": {
            "backoffLimit": 2,
            "activeDeadlineSeconds": EVAL_DEADLINE_S,
            "template": {
                "metadata": {"labels": child_labels(owner, digest)},
                "spec": pod_spec,
            },
        },
    }


def _terminated(pod: dict[str, Any]) -> dict[str, Any]:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated")
        if terminated:
            return dict(terminated)
    return {}


def _message(terminated: dict[str, Any]) -> dict[str, Any]:
    try:
        message = json.loads(terminated.get("message") or "")
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


def evaluation_outcome(
    job: dict[str, Any], pods: list[dict[str, Any]]
) -> tuple[str, dict[str, Any] | str]:
    """("done", the summary `kvops eval` left), ("failed", why) or ("running", what it waits
    for), from the Job's conditions and its pods' termination messages."""
    conditions = {
        c["type"]: c
        for c in (job.get("status") or {}).get("conditions") or []
        if c["status"] == "True"
    }
    if "Complete" in conditions:
        for pod in pods:
            terminated = _terminated(pod)
            summary = _message(terminated)
            if terminated.get("exitCode") == 0 and "passRate" in summary:
                return "done", summary
        return "failed", "the evaluation Job completed without leaving a result"
    if "Failed" in conditions:
        errors = [_message(_terminated(p)).get("error") for p in pods]
        error = next((e for e in reversed(errors) if e), None)
        failed = conditions["Failed"]
        detail = error or failed.get("message") or failed.get("reason") or "it failed"
        return "failed", f"the evaluation Job {job['metadata']['name']} failed: {detail}"
    return "running", f"the evaluation Job {job['metadata']['name']} is running"


def evaluation_result(
    job: dict[str, Any], summary: dict[str, Any], target: str, digest: str
) -> dict[str, Any]:
    """status.lastEvaluation from the Job and the summary its pod left."""
    return {
        "time": (job.get("status") or {}).get("completionTime") or kube.now(),
        "target": target,
        "contentHash": summary.get("contentHash") or digest,
        "job": job["metadata"]["name"],
        "passRate": float(summary["passRate"]),
        "passed": int(summary.get("passed", 0)),
        "failed": int(summary.get("failed", 0)),
        "failures": [str(f) for f in summary.get("failures") or []],
    }


def render_status(
    body: dict[str, Any], spec: PromptVersionSpec, siblings: list[dict[str, Any]]
) -> dict[str, Any]:
    """valid, error, contentHash and the Ready condition (the evaluation's part is separate)."""
    error = template_error(spec)
    if error is not None:
        reason, message = "TemplateInvalid", error
    else:
        duplicate = duplicate_problem(body, spec, siblings)
        reason, message = (
            ("DuplicateVersion", duplicate)
            if duplicate
            else ("TemplateValid", "the template renders with its declared variables")
        )
    generation = body["metadata"].get("generation")
    previous = (body.get("status") or {}).get("conditions") or []
    valid = reason == "TemplateValid"
    return {
        "observedGeneration": generation,
        "valid": valid,
        "error": None if valid else message,
        "contentHash": content_hash(spec),
        "conditions": [kube.condition(previous, "Ready", valid, reason, message, generation)],
    }


def invalid_status(body: dict[str, Any], message: str) -> dict[str, Any]:
    """Status of a spec the models refuse (only when the CRD's own validation was bypassed)."""
    generation = body["metadata"].get("generation")
    previous = (body.get("status") or {}).get("conditions") or []
    ready = kube.condition(previous, "Ready", False, "InvalidSpec", message, generation)
    return {
        "observedGeneration": generation,
        "valid": False,
        "error": message,
        "conditions": [ready],
    }


# ---------------------------------------------------------------------------------------- handlers

_prompt_locks = [threading.RLock() for _ in range(64)]


def prompt_lock(namespace: str, prompt: str) -> threading.RLock:
    return _prompt_locks[hash((namespace, prompt)) % len(_prompt_locks)]


def delete_stale_evaluations(body: dict[str, Any], keep: str | None) -> None:
    """Delete the evaluation Jobs and ConfigMaps of other content or datasets (all: keep None)."""
    selector = f"{UID_LABEL}={body['metadata']['uid']}"
    if keep is not None:
        selector += f",{HASH_LABEL}!={keep}"
    namespace = body["metadata"]["namespace"]
    for api_version, kind in [("batch/v1", "Job"), ("v1", "ConfigMap")]:
        for old in kube.list_objects(api_version, kind, namespace, selector):
            kube.delete(api_version, kind, old["metadata"]["name"], namespace)


def run_evaluation(
    body: dict[str, Any], spec: PromptVersionSpec, endpoint_template: str
) -> tuple[tuple[bool, str, str], dict[str, Any] | None]:
    """Start or follow the evaluation of the current content: ((Evaluated status, reason,
    message), a new status.lastEvaluation or None)."""
    assert spec.evaluation is not None
    namespace = body["metadata"]["namespace"]
    target = spec.evaluation.llm_deployment
    digest = evaluation_hash(spec)
    name = eval_job_name(body["metadata"]["name"], digest)
    delete_stale_evaluations(body, keep=digest)
    last = (body.get("status") or {}).get("lastEvaluation") or {}
    if last.get("job") == name:
        return (True, "Evaluated", _evaluated_message(last)), None
    job = kube.get("batch/v1", "Job", name, namespace)
    if job is None:
        deployment = kube.get(API_VERSION, "LLMDeployment", target, namespace)
        phase = ((deployment or {}).get("status") or {}).get("phase")
        if deployment is None or phase != "Available":
            why = "does not exist" if deployment is None else f"is not Available (phase {phase})"
            return (False, "WaitingForDeployment", f"LLMDeployment {target} {why}"), None
        try:
            target_spec = LLMDeploymentSpec.model_validate(deployment["spec"])
        except ValueError:  # changed since it became Available; its own status says why
            return (False, "WaitingForDeployment", f"LLMDeployment {target} is invalid"), None
        endpoint = endpoint_template.format(name=target, namespace=namespace)
        job = render_eval_job(body, spec, target, target_spec, endpoint)
        refused = contract.children_problem([job])
        if refused is not None:
            return (False, "UnsupportedCommand", refused), None
        try:
            kube.apply(render_eval_config_map(body, spec))
            job = kube.apply(job)
        except kube.ChildRefused as refusal:
            return (False, "ChildRefused", str(refusal)), None
    pods = kube.list_objects("v1", "Pod", namespace, f"job-name={name}")
    state, outcome = evaluation_outcome(job, pods)
    if state == "done":
        assert isinstance(outcome, dict)
        result = evaluation_result(job, outcome, target, content_hash(spec))
        return (True, "Evaluated", _evaluated_message(result)), result
    assert isinstance(outcome, str)
    if state == "failed":
        return (False, "EvaluationFailed", outcome), None
    problem = diagnosis.stuck_job_problem(diagnosis.problem_of(namespace, pods))
    if problem is not None:
        return (False, "EvaluationStuck", f"{outcome}: {problem.reason}: {problem.message}"), None
    return (False, "EvaluationRunning", f"{outcome} against LLMDeployment {target}"), None


def _evaluated_message(result: dict[str, Any]) -> str:
    total = result["passed"] + result["failed"]
    return f"pass rate {result['passRate']:.3g} ({result['passed']} of {total} cases passed)"


def own_status(
    body: dict[str, Any], versions: list[dict[str, Any]], endpoint_template: str
) -> dict[str, Any]:
    """The version's own status: validity, content hash and its evaluation."""
    try:
        spec = PromptVersionSpec.model_validate(body["spec"])
    except ValueError as error:
        return invalid_status(body, f"invalid spec: {error}")
    status = render_status(body, spec, versions_of(versions, spec.prompt_name))
    if not status["valid"] or spec.evaluation is None:
        previous = (body.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Evaluated" for c in previous):  # it had an evaluation
            delete_stale_evaluations(body, keep=None)
        return status
    (evaluated, reason, message), result = run_evaluation(body, spec, endpoint_template)
    previous = (body.get("status") or {}).get("conditions") or []
    generation = body["metadata"].get("generation")
    status["conditions"].append(
        kube.condition(previous, "Evaluated", evaluated, reason, message, generation)
    )
    if result is not None:
        status["lastEvaluation"] = result
        gate = spec.evaluation.gate
        below = gate is not None and result["passRate"] < gate.min_pass_rate
        summary = f"{message} against {result['target']}"
        kube.event(body, "Warning" if below else "Normal", "Evaluated", summary)
    elif reason in ("EvaluationFailed", "EvaluationStuck", "UnsupportedCommand", "ChildRefused"):
        kube.warn_on_new_problem(body, "Evaluated", reason, message)
    return status


def publish_labels(namespace: str, prompt: str, force_refresh: bool) -> None:
    """Write every version's held and not-held labels and users; when a label moved (or
    `force_refresh`), re-render the LLMDeployments that reference the prompt."""
    versions = kube.list_objects(API_VERSION, "PromptVersion", namespace)
    deployments = kube.list_objects(API_VERSION, "LLMDeployment", namespace)
    moved = force_refresh
    prompt_labels = PromptLabels.of(versions, prompt)
    for version in prompt_labels.siblings:
        if version["metadata"].get("deletionTimestamp"):
            continue
        held, not_held = prompt_labels.report(version)
        labels = {
            "heldLabels": held,
            "labelsNotHeld": not_held,
            "usedBy": prompt_labels.users(version, deployments),
        }
        old = version.get("status") or {}
        if any(old.get(key, []) != value for key, value in labels.items()):
            gained = sorted(set(held) - set(old.get("heldLabels") or []))
            if gained or set(old.get("heldLabels") or []) - set(held):
                moved = True
            kube.patch_status(version, labels)
            if gained:
                kube.event(version, "Normal", "LabelHeld", f"now holds {', '.join(gained)}")
    if moved:
        for deployment in deployments:
            if any(ref["name"] == prompt for ref in deployment["spec"].get("prompts") or []):
                llmdeployment.reconcile(deployment)


def reconcile(body: dict[str, Any], endpoint_template: str) -> None:
    """Bring one version's status, its evaluation and its prompt's labels up to date."""
    metadata = body["metadata"]
    namespace = metadata["namespace"]
    prompt = body["spec"].get("promptName", "")
    with prompt_lock(namespace, prompt), measured("PromptVersion"):
        current = kube.get(API_VERSION, "PromptVersion", metadata["name"], namespace)
        changed = False
        if (
            current is not None
            and current["metadata"]["uid"] == metadata["uid"]
            and not current["metadata"].get("deletionTimestamp")
        ):
            versions = kube.list_objects(API_VERSION, "PromptVersion", namespace)
            status = own_status(current, versions, endpoint_template)
            old = current.get("status") or {}
            if old.get("valid") != status["valid"]:
                ready = status["conditions"][0]
                kind = "Normal" if status["valid"] else "Warning"
                kube.event(current, kind, ready["reason"], ready["message"])
            # A version that starts or stops being servable changes the deployments' ConfigMaps
            # even when no label moves.
            changed = (old.get("valid"), old.get("contentHash")) != (
                status["valid"],
                status.get("contentHash"),
            )
            kube.patch_status(current, status)
        publish_labels(namespace, prompt, force_refresh=changed or current is None)


@kopf.on.resume(API_VERSION, "promptversions")
@kopf.on.create(API_VERSION, "promptversions")
@kopf.on.update(API_VERSION, "promptversions", field="spec")
def on_change(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    reconcile(kube.plain(body), memo.endpoint_template)


@kopf.timer(API_VERSION, "promptversions", interval=60, initial_delay=60, idle=30)
def on_timer(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Level-based safety net: a missed Job event, a target that became Available."""
    reconcile(kube.plain(body), memo.endpoint_template)


@kopf.on.event(API_VERSION, "promptversions", id="promptversion-deleted")
def on_deleted(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """A deleted version may have held a label: the others' status and the deployments follow."""
    if event["type"] == "DELETED":
        RESOURCE_STATUS.forget(kube.plain(body))
        namespace, prompt = body["metadata"]["namespace"], body["spec"]["promptName"]
        with prompt_lock(namespace, prompt):
            publish_labels(namespace, prompt, force_refresh=True)


@kopf.on.event(
    "batch/v1", "jobs", labels={UID_LABEL: kopf.PRESENT}, id="promptversion-evaluation-jobs"
)
def on_job(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """An evaluation Job progressed, finished or vanished: its PromptVersion reads it."""
    owner = kube.owner_of(kube.plain(body), API_VERSION, "PromptVersion")
    if owner is None:
        return
    metadata = owner["metadata"]
    version = kube.get(API_VERSION, "PromptVersion", metadata["name"], metadata["namespace"])
    if version is not None and version["metadata"]["uid"] == metadata["uid"]:
        reconcile(version, memo.endpoint_template)


@kopf.on.event(API_VERSION, "llmdeployments", id="promptversion-evaluation-targets")
def on_target(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """An LLMDeployment became Available: start the evaluations that wait for it."""
    if (body.get("status") or {}).get("phase") != "Available":
        return
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    for version in kube.list_objects(API_VERSION, "PromptVersion", namespace):
        evaluation = version["spec"].get("evaluation") or {}
        conditions = (version.get("status") or {}).get("conditions") or []
        waiting = any(
            c.get("type") == "Evaluated" and c.get("reason") == "WaitingForDeployment"
            for c in conditions
        )
        if evaluation.get("llmDeployment") == name and waiting:
            reconcile(version, memo.endpoint_template)
