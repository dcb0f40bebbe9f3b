"""Why a resource's pods do not run, in the words of the scheduler, the kubelet and the container
runtime: read from pod status and Warning events so that the owning resource's conditions say
it within one reconcile, instead of waiting out a progress deadline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kopf

from kvops.operator import kube
from kvops.operator.api import API_VERSION

# Container states that mean the pod will not come up by waiting.
WAITING_FAILURES = {
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
}
# Failures the kubelet only reports as events on the pod (or its claims).
EVENT_FAILURES = {
    "FailedMount",
    "FailedAttachVolume",
    "FailedCreatePodSandBox",
    "ProvisioningFailed",
}
# A crashed container's termination message can be a whole log tail: keep its end.
MESSAGE_TAIL = 600
# The init container that pulls an LLMDeployment's model (kvops.operator.modelcache). It writes
# its one-line error (`kvops: error: unknown repository: ...`) as its termination message.
MODEL_PULL_CONTAINER = "model-pull"


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MESSAGE_TAIL else "..." + text[-MESSAGE_TAIL:]


def termination_summary(terminated: dict[str, Any]) -> str:
    summary = f"exited with code {terminated.get('exitCode')}"
    if terminated.get("reason"):
        summary += f" ({terminated['reason']})"
    if terminated.get("message"):
        summary += f": {_tail(terminated['message'])}"
    return summary


def _pull_problem(pod: dict[str, Any]) -> Problem | None:
    """A failed model pull, at its first failure: the kubelet retries it with a growing back-off,
    which no waiting mends (the source, the credentials or the disk must change)."""
    for container in (pod.get("status") or {}).get("initContainerStatuses") or []:
        if container["name"] != MODEL_PULL_CONTAINER:
            continue
        state = container.get("state") or {}
        last = (container.get("lastState") or {}).get("terminated") or {}
        terminated = state.get("terminated") or ({} if "running" in state else last)
        if terminated.get("exitCode", 0) != 0:
            message = (terminated.get("message") or "").strip()
            detail = _tail(message) if message else termination_summary(terminated)
            return Problem("ModelPullFailed", f"pod {pod['metadata']['name']}: {detail}")
    return None


def _container_problem(pod: dict[str, Any]) -> Problem | None:
    pull = _pull_problem(pod)
    if pull is not None:
        return pull
    name = pod["metadata"]["name"]
    status = pod.get("status") or {}
    restart_never = (pod.get("spec") or {}).get("restartPolicy") == "Never"
    for container in (status.get("initContainerStatuses") or []) + (
        status.get("containerStatuses") or []
    ):
        state = container.get("state") or {}
        waiting = state.get("waiting") or {}
        where = f"pod {name} container {container['name']}"
        if waiting.get("reason") in WAITING_FAILURES:
            last = (container.get("lastState") or {}).get("terminated")
            detail = termination_summary(last) if last else _tail(waiting.get("message") or "")
            return Problem(waiting["reason"], f"{where}: {detail}")
        terminated = state.get("terminated") or {}
        if restart_never and terminated.get("exitCode", 0) != 0:
            return Problem("ContainerFailed", f"{where}: {termination_summary(terminated)}")
    return None


def _claims(pod: dict[str, Any]) -> set[str]:
    return {
        volume["persistentVolumeClaim"]["claimName"]
        for volume in (pod.get("spec") or {}).get("volumes") or []
        if "persistentVolumeClaim" in volume
    }


def _event_problem(pod: dict[str, Any], events: list[dict[str, Any]]) -> Problem | None:
    """The newest failure event about the pod or one of its claims."""
    subjects = {("Pod", pod["metadata"]["name"])} | {
        ("PersistentVolumeClaim", claim) for claim in _claims(pod)
    }
    relevant = [
        event
        for event in events
        if event.get("reason") in EVENT_FAILURES
        and ((event.get("involvedObject") or {}).get("kind"), event["involvedObject"].get("name"))
        in subjects
    ]
    if not relevant:
        return None
    newest = max(relevant, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    subject = newest["involvedObject"]
    return Problem(
        newest["reason"],
        f"{subject['kind'].lower()} {subject['name']}: {_tail(newest.get('message') or '')}",
    )


def needs_events(pods: list[dict[str, Any]]) -> bool:
    """Whether some pod is stuck before its containers start, where only events say why."""
    return any((pod.get("status") or {}).get("phase", "Pending") == "Pending" for pod in pods)


def pod_problem(pods: list[dict[str, Any]], events: list[dict[str, Any]]) -> Problem | None:
    """The first reason, newest pod first, why one of these pods does not run."""
    live = [pod for pod in pods if not pod["metadata"].get("deletionTimestamp")]
    live.sort(key=lambda pod: pod["metadata"].get("creationTimestamp") or "", reverse=True)
    for pod in live:
        status = pod.get("status") or {}
        for condition in status.get("conditions") or []:
            if (
                condition.get("type") == "PodScheduled"
                and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"
            ):
                # An unbound claim's own events say why it does not bind.
                claim_event = _event_problem(pod, events)
                if claim_event is not None:
                    return claim_event
                message = f"pod {pod['metadata']['name']}: {condition.get('message', '')}"
                return Problem("Unschedulable", message)
        problem = _container_problem(pod)
        if problem is None and status.get("phase", "Pending") == "Pending":
            problem = _event_problem(pod, events)
        if problem is not None:
            return problem
    return None


def problem_of(namespace: str, pods: list[dict[str, Any]]) -> Problem | None:
    """`pod_problem` for pods read from the cluster; Warning events are only read (one list)
    while some pod is stuck before its containers start."""
    events = []
    if needs_events(pods):
        events = kube.list_objects("v1", "Event", namespace, field_selector="type=Warning")
    return pod_problem(pods, events)


def stuck_job_problem(problem: Problem | None) -> Problem | None:
    """The problem of a running Job's pods that waiting will not mend. A failed pod is not one:
    the Job retries it or fails itself, and its own verdict says which."""
    if problem is not None and problem.reason == "ContainerFailed":
        return None
    return problem


def reconcile_on_pod_problems(
    label: str, kind: str, reconcile: Callable[[dict[str, Any]], None]
) -> None:
    """Register a kopf handler: when a pod carrying `label` shows a problem in its own status
    (crash loop, pull failure, missing Secret, unschedulable), the resource of `kind` named by
    that label reconciles, so its status says so now. Pods are owned by ReplicaSets and Jobs, not
    by our resources: the label finds them. Healthy pod changes are left to the Deployment and Job
    events (a pod becoming ready changes its Deployment's status), which keeps a rollout of many
    resources from reconciling each one per pod update."""

    def on_pod(body: kopf.Body, **_: Any) -> None:
        pod = kube.plain(body)
        name = pod["metadata"].get("labels", {}).get(label)
        if not name or pod_problem([pod], []) is None:
            return
        owner = kube.get(API_VERSION, kind, name, pod["metadata"]["namespace"])
        if owner is not None:
            reconcile(owner)

    kopf.on.event("v1", "pods", labels={label: kopf.PRESENT}, id=f"{kind.lower()}-pods")(on_pod)
