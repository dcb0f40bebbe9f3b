"""Pulled model sources in the operator (pure): the `model-pull` init container, the cache
volume and claim, the revision pin through the `<name>-model` ConfigMap, credentials, the
cache's status and a failed pull's condition. The pod status shapes are the kubelet's own, as a
real node reports them in e2e/test_real_pods_model_cache.py."""

from __future__ import annotations

import json

import pytest

from kvops.operator import contract, diagnosis, llmdeployment, modelcache, rbac
from kvops.operator.api import LLMDeploymentSpec

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HF = {"model": {"source": "hf://org/smollm2@main"}, "gpus": 1}


def owner(spec: dict, status: dict | None = None) -> dict:
    metadata = {"name": "chat", "namespace": "team", "uid": "uid-1", "generation": 1}
    body = {"apiVersion": "kvops.io/v1alpha1", "kind": "LLMDeployment", "metadata": metadata}
    return {**body, "spec": spec, "status": status or {}}


def render(spec: dict, pinned: str | None = None) -> tuple[dict, list]:
    children, stale = llmdeployment.render(
        owner(spec), LLMDeploymentSpec.model_validate(spec), [], pinned
    )
    by_kind: dict = {}
    for child in children:
        by_kind.setdefault(child["kind"], []).append(child)
    return by_kind, stale


def pod_spec(spec: dict) -> dict:
    return render(spec)[0]["Deployment"][0]["spec"]["template"]["spec"]


def test_the_pull_runs_before_the_worker_into_the_cache_volume():
    pod = pod_spec(HF)
    [pull] = pod["initContainers"]
    [worker] = pod["containers"]
    assert pull["name"] == "model-pull" and pull["image"] == worker["image"]
    assert pull["args"] == [
        "model", "pull", "$(KVOPS_MODEL_SOURCE)", "--cache", "/model-cache",
        "--termination-log", "/dev/termination-log",
    ]  # fmt: skip
    args = worker["args"]
    assert args[args.index("--model") + 1] == "$(KVOPS_MODEL_SOURCE)"
    assert args[args.index("--model-cache") + 1] == "/model-cache"
    for container in (pull, worker):
        source = next(e for e in container["env"] if e["name"] == "KVOPS_MODEL_SOURCE")
        assert source["valueFrom"] == {"configMapKeyRef": {"name": "chat-model", "key": "source"}}
        assert {"name": "model-cache", "mountPath": "/model-cache"} in container["volumeMounts"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The GPU is the worker's: the pull needs none.
    assert "nvidia.com/gpu" not in json.dumps(pull["resources"])
    assert worker["resources"]["limits"] == {"nvidia.com/gpu": 1}
    # The startup probe times the load only; the progress deadline allows for the pull.
    assert "startupProbe" not in pull and "startupProbe" in worker
    # Both command lines are ones the worker's own parser accepts.
    assert contract.command_problem(pull) is None and contract.command_problem(worker) is None


def test_by_default_each_deployment_gets_its_own_claim():
    children, stale = render(HF)
    [claim] = children["PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == "chat-model-cache"
    assert claim["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert claim["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "100Gi"}},
    }
    volume = next(v for v in pod_spec(HF)["volumes"] if v["name"] == "model-cache")
    assert volume["persistentVolumeClaim"] == {"claimName": "chat-model-cache"}
    # The ConfigMap and claim are applied before the Deployment whose pods need them.
    kinds = [c["kind"] for c in llmdeployment.render(
        owner(HF), LLMDeploymentSpec.model_validate(HF), [])[0]]  # fmt: skip
    assert kinds.index("PersistentVolumeClaim") < kinds.index("Deployment")
    assert kinds.index("ConfigMap") < kinds.index("Deployment")


def test_a_named_claim_is_shared_and_never_created_nor_deleted():
    spec = {**HF, "model": {**HF["model"], "cache": {"claimName": "kvops-model-cache"}}}
    children, stale = render(spec)
    assert "PersistentVolumeClaim" not in children
    volume = next(v for v in pod_spec(spec)["volumes"] if v["name"] == "model-cache")
    assert volume["persistentVolumeClaim"] == {"claimName": "kvops-model-cache"}
    assert ("v1", "PersistentVolumeClaim", "chat-model-cache") in stale


def test_an_empty_dir_cache_and_the_claim_options():
    spec = {**HF, "model": {**HF["model"], "cache": {"emptyDir": True}}}
    volume = next(v for v in pod_spec(spec)["volumes"] if v["name"] == "model-cache")
    assert volume == {"name": "model-cache", "emptyDir": {}}
    sized = {"size": "20Gi", "storageClassName": "nfs", "accessMode": "ReadWriteMany"}
    spec = {**HF, "model": {**HF["model"], "cache": sized}}
    [claim] = render(spec)[0]["PersistentVolumeClaim"]
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "20Gi"}},
        "storageClassName": "nfs",
    }
    with pytest.raises(ValueError, match="at most one of claimName and emptyDir"):
        LLMDeploymentSpec.model_validate(
            {"model": {"source": "hf://a/b", "cache": {"claimName": "c", "emptyDir": True}}}
        )


def test_sources_read_in_place_have_no_pull_no_cache_and_drop_the_model_children():
    spec = {"model": {"source": "builtin://smollm2"}}
    pod = pod_spec(spec)
    assert "initContainers" not in pod
    assert all(v["name"] != "model-cache" for v in pod["volumes"])
    args = pod["containers"][0]["args"]
    assert "--model-cache" not in args and args[args.index("--model") + 1] == "default"
    _, stale = render(spec)
    assert ("v1", "ConfigMap", "chat-model") in stale
    assert ("v1", "PersistentVolumeClaim", "chat-model-cache") in stale
    # A user's claim that happens to have the cache's name is not the operator's to delete.
    _, stale = render({"model": {"source": "pvc://chat-model-cache/llama"}})
    assert ("v1", "PersistentVolumeClaim", "chat-model-cache") not in stale


def test_the_config_map_pins_the_resolved_revision_without_rolling_pods():
    before, _ = render(HF)
    after, _ = render(HF, pinned=f"hf://org/smollm2@{COMMIT}")
    [unpinned] = [c for c in before["ConfigMap"] if c["metadata"]["name"] == "chat-model"]
    [pinned] = [c for c in after["ConfigMap"] if c["metadata"]["name"] == "chat-model"]
    assert unpinned["data"] == {"source": "hf://org/smollm2@main"}
    assert pinned["data"] == {"source": f"hf://org/smollm2@{COMMIT}"}
    assert before["Deployment"] == after["Deployment"]  # same template: nothing rolls


@pytest.mark.parametrize(
    ("source", "revision", "expected"),
    [
        ("hf://org/smollm2@main", COMMIT, f"hf://org/smollm2@{COMMIT}"),
        ("hf://org/smollm2", COMMIT, f"hf://org/smollm2@{COMMIT}"),
        ("hf://org/smollm2@refs/pr/1", COMMIT, f"hf://org/smollm2@{COMMIT}"),
        ("s3://models/llama/8b/", "f" * 40, f"s3://models/llama/8b@{'f' * 40}"),
        ("s3://models/llama@" + "a" * 40, "a" * 40, f"s3://models/llama@{'a' * 40}"),
    ],
)
def test_pinned_sources(source, revision, expected):
    spec = LLMDeploymentSpec.model_validate({"model": {"source": source}})
    assert modelcache.pinned_source(spec, {"source": source, "revision": revision}) == expected
    # A revision resolved for another source (the spec changed since) is not a pin.
    assert modelcache.pinned_source(spec, {"source": "hf://x/y", "revision": revision}) == source
    assert modelcache.pinned_source(spec, None) == source


def test_credentials_come_from_the_named_secret_and_the_endpoint_is_set():
    model = {
        "source": "s3://models/llama",
        "credentialsSecret": "s3-credentials",
        "endpoint": "http://minio.storage:9000",
    }
    pod = pod_spec({"model": model, "gpus": 0})
    for container in pod["initContainers"] + pod["containers"]:
        assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
        endpoint = next(e for e in container["env"] if e["name"] == "AWS_ENDPOINT_URL")
        assert endpoint["value"] == "http://minio.storage:9000"
    hf = pod_spec({"model": {**HF["model"], "endpoint": "http://hub.local"}, "gpus": 0})
    assert {"name": "HF_ENDPOINT", "value": "http://hub.local"} in hf["initContainers"][0]["env"]
    # A user's own variable still wins over the operator's default.
    env = [{"name": "HF_ENDPOINT", "value": "http://mine"}]
    mine = pod_spec({"model": {**HF["model"], "endpoint": "http://hub.local"}, "env": env})
    assert [e["value"] for e in mine["containers"][0]["env"] if e["name"] == "HF_ENDPOINT"] == [
        "http://mine"
    ]
    with pytest.raises(ValueError, match="set by the operator"):
        LLMDeploymentSpec.model_validate(
            {"model": HF["model"], "env": [{"name": "KVOPS_MODEL_SOURCE", "value": "x"}]}
        )


# ---------------------------------------------------------------------------------------- status


def worker_pod(name: str, created: str, pull: dict) -> dict:
    return {
        "metadata": {"name": name, "creationTimestamp": created},
        "spec": {"restartPolicy": "Always"},
        "status": {"phase": "Pending", "initContainerStatuses": [{"name": "model-pull", **pull}]},
    }


def pulled(revision: str = COMMIT, source: str = "hf://org/smollm2@main") -> dict:
    line = json.dumps({
        "source": source, "revision": revision, "path": f"/model-cache/x/{revision}",
        "bytes": 270911346, "files": 6, "seconds": 3.2, "downloaded": 270911346,
    })  # fmt: skip
    return {"state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": line}}}


ERROR = "kvops: error: unknown repository: org/missing (is HF_ENDPOINT right?)"
FAILED = {
    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}},
    "lastState": {"terminated": {"exitCode": 2, "reason": "Error", "message": ERROR + "\n"}},
}
RUNNING = {"state": {"running": {"startedAt": "2026-11-30T06:00:01Z"}}}
PROGRESS_LOG = (
    "2026-11-30 06:00:02 INFO kvops.worker.models.hf: resolving\n"
    "kvops: pull hf://org/smollm2@main: 104.9 MB of 270.9 MB (39%), 52.4 MB/s, ETA 3s\n"
)


def status(pods: list, previous: dict | None = None, spec: dict = HF, log: str = "") -> dict:
    parsed = LLMDeploymentSpec.model_validate(spec)
    result = modelcache.cache_status("chat", parsed, pods, previous, lambda pod: log)
    assert result is not None
    return result


def test_status_pending_pulling_ready():
    assert status([])["state"] == "Pending"
    assert status([])["volume"] == "persistentVolumeClaim/chat-model-cache"
    pulling = status([worker_pod("a", "t1", RUNNING)], log=PROGRESS_LOG)
    assert pulling["state"] == "Pulling"
    assert pulling["bytesDone"] == 104_900_000
    assert pulling["progress"] == "104.9 MB of 270.9 MB (39%), 52.4 MB/s, ETA 3s"
    ready = status([worker_pod("a", "t1", pulled())])
    assert (ready["state"], ready["revision"], ready["bytes"], ready["files"]) == (
        "Ready", COMMIT, 270911346, 6,
    )  # fmt: skip
    assert ready["bytesDone"] is None and ready["message"] is None  # cleared by the merge patch


def test_the_pin_stays_when_pods_go_and_a_new_spec_source_starts_over():
    ready = status([worker_pod("a", "t1", pulled())])
    assert status([], previous=ready)["state"] == "Ready"  # scaled to zero
    assert status([], previous=ready)["revision"] == COMMIT
    # A pod that pulled before the pin and saw another commit does not move the pin.
    other = worker_pod("b", "t2", pulled(revision="f" * 40))
    assert status([other, worker_pod("a", "t1", pulled())], previous=ready)["revision"] == COMMIT
    moved = {**HF, "model": {"source": "hf://org/other@main"}}
    fresh = status([worker_pod("a", "t1", pulled())], previous=ready, spec=moved)
    assert (fresh["state"], fresh["revision"]) == ("Pending", None)


def test_a_failed_pull_is_failed_with_its_error_line_and_degrades_the_resource():
    failed = status([worker_pod("a", "t1", FAILED)])
    assert failed["state"] == "Failed" and failed["message"] == ERROR
    problem = diagnosis.pod_problem([worker_pod("a", "t1", FAILED)], [])
    assert problem == diagnosis.Problem("ModelPullFailed", f"pod a: {ERROR}")
    # Already at the first failure, before the kubelet's back-off starts.
    first = {"state": {"terminated": {"exitCode": 2, "reason": "Error", "message": ERROR}}}
    assert diagnosis.pod_problem([worker_pod("a", "t1", first)], []).reason == "ModelPullFailed"
    # A pull that is running or done is not a problem.
    assert diagnosis.pod_problem([worker_pod("a", "t1", RUNNING)], []) is None
    assert diagnosis.pod_problem([worker_pod("a", "t1", pulled())], []) is None
    body = owner(HF)
    rendered = llmdeployment.render_status(
        body, LLMDeploymentSpec.model_validate(HF), None, problem, failed
    )
    [degraded] = [c for c in rendered["conditions"] if c["type"] == "Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("True", "ModelPullFailed")
    assert ERROR in degraded["message"] and rendered["modelCache"]["state"] == "Failed"


def test_in_place_sources_have_no_cache_status():
    spec = LLMDeploymentSpec.model_validate({"model": {"source": "pvc://models/llama"}})
    assert modelcache.cache_status("chat", spec, [], None) is None


def test_the_operator_may_read_pod_logs_and_nothing_more_of_them():
    rules = rbac.rules(False)
    logs = [r for r in rules if "pods/log" in r["resources"]]
    assert logs == [{"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}]
