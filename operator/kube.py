"""The one place that talks to the Kubernetes API server.

Children are written with server-side apply under one field manager, so re-applying the same
desired object is a no-op and the operator owns exactly the fields it renders. The pure helpers
(owner references, conditions) live here too because every resource module uses them.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import kopf

from kvops.operator.metrics import RESOURCE_STATUS, measured

FIELD_MANAGER = "kvops-operator"
MANAGED_BY = {"app.kubernetes.io/managed-by": FIELD_MANAGER}

_client_lock = threading.Lock()
_client: Any = None
# Reconciles of one object are serialized (kopf handlers and child events run in threads); a
# fixed set of locks picked by uid keeps memory bounded. They are reentrant because a
# PromptVersion reconcile re-renders LLMDeployments under its own lock (two uids may share a
# lock); the order is always PromptVersion, then LLMDeployment, never the reverse.
_object_locks = [threading.RLock() for _ in range(64)]


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def plain(body: Any) -> dict[str, Any]:
    """A deep, plain-dict copy of what kopf hands a handler (its Body is a read-only view)."""
    return json.loads(json.dumps(dict(body)))


def owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    """The reference that makes the garbage collector delete a child with its owner."""
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def event(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """A Kubernetes Event about `body` (kopf takes any mapping with metadata; its annotation only
    names its own Body view)."""
    kopf.event(cast(kopf.Body, body), type=type_, reason=reason, message=message)


def post_phase_change(
    body: dict[str, Any], status: dict[str, Any], *, warning: bool, reason: str
) -> None:
    """A Kubernetes Event when the status about to be written moves the resource to a new phase."""
    old_phase = (body.get("status") or {}).get("phase")
    if old_phase != status["phase"]:
        event(
            body,
            "Warning" if warning else "Normal",
            reason,
            f"phase {old_phase} -> {status['phase']}",
        )


def warn_on_new_problem(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """A Warning Event when condition `type_` is about to report a problem with a new reason or
    message, so a repeated reconcile of the same problem does not flood the resource's events."""
    previous = next(
        (c for c in (body.get("status") or {}).get("conditions") or [] if c.get("type") == type_),
        None,
    )
    if previous is None or (previous.get("reason"), previous.get("message")) != (reason, message):
        event(body, "Warning", reason, message)


def owner_of(child: dict[str, Any], api_version: str, kind: str) -> dict[str, Any] | None:
    """A reference-shaped stub of the child's owner of this kind (reconcile re-reads it)."""
    for ref in child["metadata"].get("ownerReferences", []):
        if ref.get("apiVersion") == api_version and ref.get("kind") == kind:
            metadata = {
                "name": ref["name"],
                "namespace": child["metadata"]["namespace"],
                "uid": ref["uid"],
            }
            return {"apiVersion": api_version, "kind": kind, "metadata": metadata}
    return None


def condition(
    previous: list[dict[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int | None,
) -> dict[str, Any]:
    """A condition whose lastTransitionTime only moves when its status changes."""
    value = "True" if status else "False"
    old = next((c for c in previous if c.get("type") == type_), None)
    changed = old is None or old.get("status") != value
    return {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now() if changed or old is None else old["lastTransitionTime"],
        "observedGeneration": generation,
    }


def _dynamic() -> Any:
    with _client_lock:
        return _dynamic_unlocked()


def _dynamic_unlocked() -> Any:
    global _client
    if _client is None:
        from kubernetes import config, dynamic
        from kubernetes.client import api_client

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        _client = dynamic.DynamicClient(api_client.ApiClient())
    return _client


_resources: dict[tuple[str, str], Any] = {}


def _resource(api_version: str, kind: str) -> Any:
    # Discovery is slow and its cache is not thread-safe; kopf runs handlers in threads.
    with _client_lock:
        if (api_version, kind) not in _resources:
            _resources[api_version, kind] = _dynamic_unlocked().resources.get(
                api_version=api_version, kind=kind
            )
        return _resources[api_version, kind]


# When an optional kind (KEDA's ScaledObject) was last found missing: every look-up of a kind the
# cluster lacks re-reads API discovery, so a missing one is looked up again only after a while.
_absent_kinds: dict[tuple[str, str], float] = {}
ABSENT_KIND_RECHECK_S = 300.0


def kind_served(api_version: str, kind: str) -> bool:
    """Whether the API server serves this kind (an add-on such as KEDA may be missing)."""
    from kubernetes.dynamic.exceptions import ResourceNotFoundError

    missing_since = _absent_kinds.get((api_version, kind))
    if missing_since is not None and time.monotonic() - missing_since < ABSENT_KIND_RECHECK_S:
        return False
    try:
        _resource(api_version, kind)
    except ResourceNotFoundError:
        _absent_kinds[api_version, kind] = time.monotonic()
        return False
    return True


class ChildRefused(Exception):
    """The API server refused a child as invalid or forbidden: retrying the same object cannot
    succeed, so the owner's status must say why."""


def _api_message(error: Any) -> str:
    try:
        return json.loads(error.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(error.summary() if hasattr(error, "summary") else error)


def apply(obj: dict[str, Any]) -> dict[str, Any]:
    """Server-side apply of a whole desired object (force: the operator owns what it renders)."""
    from kubernetes.dynamic.exceptions import DynamicApiError

    resource = _resource(obj["apiVersion"], obj["kind"])
    try:
        result = _dynamic().server_side_apply(
            resource,
            body=obj,
            namespace=obj["metadata"].get("namespace"),
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
        )
    except DynamicApiError as error:
        if error.status in (400, 403, 422):
            name = obj["metadata"]["name"]
            raise ChildRefused(f"{obj['kind']} {name}: {_api_message(error)}") from error
        raise
    return result.to_dict()


def get(api_version: str, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    from kubernetes.dynamic.exceptions import NotFoundError

    try:
        return _resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
    except NotFoundError:
        return None


def list_objects(
    api_version: str,
    kind: str,
    namespace: str,
    label_selector: str | None = None,
    field_selector: str | None = None,
) -> list[dict[str, Any]]:
    result = _resource(api_version, kind).get(
        namespace=namespace, label_selector=label_selector, field_selector=field_selector
    )
    return result.to_dict()["items"]


def pod_log_tail(namespace: str, pod: str, container: str, lines: int = 5) -> str:
    """The last lines of a container's log ("" when there is none yet or the pod is gone)."""
    from kubernetes.client import CoreV1Api
    from kubernetes.client.exceptions import ApiException

    try:
        return str(
            CoreV1Api(_dynamic().client).read_namespaced_pod_log(
                pod, namespace, container=container, tail_lines=lines
            )
        )
    except ApiException:
        return ""


def delete(api_version: str, kind: str, name: str, namespace: str) -> bool:
    """Delete (the children of a Job too); False when it was already gone."""
    from kubernetes.dynamic.exceptions import NotFoundError

    try:
        _resource(api_version, kind).delete(
            name=name, namespace=namespace, body={"propagationPolicy": "Background"}
        )
    except NotFoundError:
        return False
    return True


def patch(api_version: str, kind: str, name: str, namespace: str, body: dict[str, Any]) -> None:
    """A JSON merge patch (used for the spec of a resource the operator does not own)."""
    _resource(api_version, kind).patch(
        name=name, namespace=namespace, body=body, content_type="application/merge-patch+json"
    )


def patch_status(obj: dict[str, Any], status: dict[str, Any]) -> None:
    """Merge-patch the status subresource; a vanished object is not an error."""
    from kubernetes.dynamic.exceptions import NotFoundError

    resource = _resource(obj["apiVersion"], obj["kind"])
    metadata = obj["metadata"]
    path = resource.path(name=metadata["name"], namespace=metadata["namespace"]) + "/status"
    try:
        _dynamic().request(
            "patch", path, body={"status": status}, content_type="application/merge-patch+json"
        )
    except NotFoundError:
        RESOURCE_STATUS.forget(obj)
    else:
        RESOURCE_STATUS.observe(obj, status)


@contextlib.contextmanager
def reconciling(obj: dict[str, Any], kind: str) -> Iterator[dict[str, Any] | None]:
    """The skeleton of every kind's reconcile: hold the object's lock, read it afresh, yield None
    once it is gone or being deleted, and count and time the reconcile."""
    with exclusive(obj) as current:
        if current is None or current["metadata"].get("deletionTimestamp"):
            RESOURCE_STATUS.forget(obj)
            yield None
            return
        with measured(kind):
            yield current


@contextlib.contextmanager
def exclusive(obj: dict[str, Any]) -> Iterator[dict[str, Any] | None]:
    """Hold the object's reconcile lock and yield its current state (None once it is gone)."""
    metadata = obj["metadata"]
    with _object_locks[hash(metadata["uid"]) % len(_object_locks)]:
        current = get(obj["apiVersion"], obj["kind"], metadata["name"], metadata["namespace"])
        if current is None or current["metadata"]["uid"] != metadata["uid"]:
            yield None
        else:
            yield current
