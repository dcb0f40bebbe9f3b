"""How pod status and events become an owner's Degraded condition (pure; the shapes are the
kubelet's and scheduler's own, as a real node reports them in e2e/test_real_pods.py)."""

from __future__ import annotations

from kvops.operator import diagnosis, llmdeployment
from kvops.operator.api import LLMDeploymentSpec
from kvops.operator.diagnosis import Problem


def pod(name="chat-7d9f-abcde", created="2026-11-30T06:00:00Z", phase="Pending", **status):
    return {
        "metadata": {"name": name, "creationTimestamp": created},
        "spec": {
            "restartPolicy": status.pop("restart_policy", "Always"),
            "volumes": status.pop("volumes", []),
        },
        "status": {"phase": phase, **status},
    }


def waiting(reason, message="", last=None, name="worker"):
    container = {"name": name, "state": {"waiting": {"reason": reason, "message": message}}}
    if last:
        container["lastState"] = {"terminated": last}
    return {"containerStatuses": [container]}


def event(kind, name, reason, message, when="2026-11-30T06:01:00Z"):
    return {
        "involvedObject": {"kind": kind, "name": name},
        "reason": reason,
        "message": message,
        "type": "Warning",
        "lastTimestamp": when,
    }


def test_a_crash_loop_quotes_the_last_termination_message():
    crashed = {
        "exitCode": 2,
        "reason": "Error",
        "message": "Traceback ...\nkvops: error: model '/models/m/x': no such file or folder\n",
    }
    problem = diagnosis.pod_problem(
        [pod(phase="Running", **waiting("CrashLoopBackOff", "back-off 10s", crashed))], []
    )
    assert problem.reason == "CrashLoopBackOff"
    assert problem.message.startswith("pod chat-7d9f-abcde container worker: exited with code 2")
    assert problem.message.endswith("kvops: error: model '/models/m/x': no such file or folder")


def test_pull_failures_and_missing_secrets_are_named():
    pull = waiting("ErrImageNeverPull", 'Container image "ghcr.io/x/y:9" is not present')
    assert diagnosis.pod_problem([pod(**pull)], []) == Problem(
        "ErrImageNeverPull",
        'pod chat-7d9f-abcde container worker: Container image "ghcr.io/x/y:9" is not present',
    )
    secret = waiting("CreateContainerConfigError", 'secret "huggingface" not found')
    assert diagnosis.pod_problem([pod(**secret)], []).message.endswith(
        'secret "huggingface" not found'
    )


def test_unschedulable_pods_say_why_and_unbound_claims_quote_their_own_events():
    unschedulable = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims.",
    }
    stuck = pod(conditions=[unschedulable], volumes=[{"persistentVolumeClaim": {"claimName": "m"}}])
    assert diagnosis.pod_problem([stuck], []).reason == "Unschedulable"
    claim_event = event(
        "PersistentVolumeClaim", "m", "ProvisioningFailed", 'storageclass "fast" not found'
    )
    other = event("PersistentVolumeClaim", "other", "ProvisioningFailed", "not ours")
    problem = diagnosis.pod_problem([stuck], [other, claim_event])
    assert problem == Problem(
        "ProvisioningFailed", 'persistentvolumeclaim m: storageclass "fast" not found'
    )


def test_mount_failures_come_from_events_while_the_pod_is_pending():
    stuck = pod(**waiting("ContainerCreating"))
    mount = event("Pod", "chat-7d9f-abcde", "FailedMount", 'configmap "chat-prompts" not found')
    assert diagnosis.needs_events([stuck])
    assert diagnosis.pod_problem([stuck], [mount]).reason == "FailedMount"
    assert diagnosis.pod_problem([stuck], []) is None  # still starting: not a problem yet


def test_healthy_and_terminating_pods_are_not_problems_and_the_newest_pod_speaks_first():
    running = pod(phase="Running", containerStatuses=[{"name": "worker", "state": {"running": {}}}])
    assert not diagnosis.needs_events([running])
    assert diagnosis.pod_problem([running], []) is None
    old = pod("old", "2026-11-30T05:00:00Z", **waiting("ImagePullBackOff", "old image"))
    new = pod("new", "2026-11-30T06:00:00Z", **waiting("CrashLoopBackOff", "new spec"))
    assert diagnosis.pod_problem([old, new], []).message == "pod new container worker: new spec"
    old["metadata"]["deletionTimestamp"] = "2026-11-30T06:05:00Z"
    new["status"] = {"phase": "Running"}
    assert diagnosis.pod_problem([old, new], []) is None


def test_a_failed_job_pod_is_a_problem_only_when_it_does_not_restart():
    failed = {"exitCode": 1, "reason": "Error", "message": "boom"}
    job_pod = pod(
        phase="Failed",
        restart_policy="Never",
        containerStatuses=[{"name": "build", "state": {"terminated": failed}}],
    )
    assert diagnosis.pod_problem([job_pod], []) == Problem(
        "ContainerFailed", "pod chat-7d9f-abcde container build: exited with code 1 (Error): boom"
    )


def test_a_problem_makes_the_llmdeployment_degraded_not_progressing():
    body = {
        "metadata": {"name": "chat", "namespace": "team", "generation": 2},
        "spec": {"model": {"source": "builtin://smollm2"}},
    }
    spec = LLMDeploymentSpec.model_validate(body["spec"])
    status = llmdeployment.render_status(body, spec, None, Problem("ErrImagePull", "no image"))
    conditions = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Degraded"
    assert conditions["Degraded"]["status"] == "True"
    assert (conditions["Degraded"]["reason"], conditions["Degraded"]["message"]) == (
        "ErrImagePull",
        "no image",
    )
    assert conditions["Progressing"]["status"] == "False"
    assert conditions["Ready"]["status"] == "False"


def test_bad_names_are_refused_before_any_apply():
    body = {
        "metadata": {"name": "9starts-with-digit", "namespace": "team"},
        "spec": {"model": {"source": "hf://org/model@main"}},
    }
    assert llmdeployment.spec_problem(body)[1].reason == "InvalidName"
    body["metadata"]["name"] = "chat"
    assert llmdeployment.spec_problem(body)[1] is None  # hf:// is pulled by an init container
    body["metadata"]["name"] = "x" * 64
    assert "at most 63 characters" in llmdeployment.spec_problem(body)[1].message


def test_model_settings_the_worker_does_not_honour_are_refused():
    body = {"metadata": {"name": "chat", "namespace": "team"}, "spec": {"model": {}}}
    body["spec"]["model"] = {"source": "builtin://smollm2", "quantization": "q4_1"}
    assert llmdeployment.spec_problem(body)[1] is None  # passed to the worker (issue 15)
    body["spec"]["model"] = {"source": "builtin://smollm2", "format": "safetensors"}
    assert llmdeployment.spec_problem(body)[1].reason == "UnsupportedFormat"
    body["spec"]["model"] = {"source": "pvc://models/llama", "dtype": "float16"}
    assert llmdeployment.spec_problem(body)[1] is None
