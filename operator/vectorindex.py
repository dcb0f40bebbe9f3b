"""VectorIndex: render the index's PVC, the build Job (named after a hash of what shapes the
index, so a changed spec builds anew), the search Deployment and Service (pure functions), then
the handlers that apply them and report the build's result."""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Any

import kopf

from kvops.operator import contract, diagnosis, kube
from kvops.operator.api import API_VERSION, VectorIndexSpec, name_problem
from kvops.operator.diagnosis import Problem
from kvops.operator.pods import (
    GRPC_PORT,
    HTTP_PORT,
    http_probe,
    restricted_container_security,
    restricted_pod_security,
)

INDEX_DIR = "/index"
SOURCE_DIR = "/source"


def child_labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": f"kvops-index-{component}",
        "app.kubernetes.io/instance": name,
        **kube.MANAGED_BY,
        "kvops.io/vectorindex": name,
    }


def build_hash(spec: VectorIndexSpec) -> str:
    """What the built index depends on; serving replicas and storage size do not rebuild it."""
    shaping = spec.model_dump(
        mode="json",
        by_alias=True,
        include={"source", "chunking", "embedding", "index_type", "metric"},
    )
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:10]


def metadata(owner: dict[str, Any], name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner["metadata"]["namespace"],
        "labels": child_labels(owner["metadata"]["name"], component),
        "ownerReferences": [kube.owner_reference(owner)],
    }


def render_documents_config_map(owner: dict[str, Any], spec: VectorIndexSpec) -> dict[str, Any]:
    documents = [d.model_dump() for d in spec.source.documents or []]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(owner, f"{owner['metadata']['name']}-documents", "build"),
        "data": {"documents.json": json.dumps(documents, indent=1)},
    }


def render_claim(owner: dict[str, Any], spec: VectorIndexSpec) -> dict[str, Any]:
    claim_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": str(spec.storage.size)}},
    }
    if spec.storage.storage_class_name:
        claim_spec["storageClassName"] = spec.storage.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(owner, f"{owner['metadata']['name']}-index", "storage"),
        "spec": claim_spec,
    }


def source_volume(owner: dict[str, Any], spec: VectorIndexSpec) -> tuple[dict, str]:
    """The volume holding the documents, and the path of the documents inside the pod."""
    source = spec.source
    if source.config_map is not None:
        return {"name": "source", "configMap": {"name": source.config_map.name}}, SOURCE_DIR
    if source.pvc is not None:
        claim = {"claimName": source.pvc.claim_name, "readOnly": True}
        path = f"{SOURCE_DIR}/{source.pvc.path.lstrip('/')}".rstrip("/")
        return {"name": "source", "persistentVolumeClaim": claim}, path
    config_map = {"name": f"{owner['metadata']['name']}-documents"}
    return {"name": "source", "configMap": config_map}, f"{SOURCE_DIR}/documents.json"


def render_build_job(owner: dict[str, Any], spec: VectorIndexSpec) -> dict[str, Any]:
    name = owner["metadata"]["name"]
    volume, source_path = source_volume(owner, spec)
    job_metadata = metadata(owner, f"{name}-build-{build_hash(spec)}", "build")
    job_metadata["labels"]["kvops.io/build-hash"] = build_hash(spec)
    container = {
        "name": "build",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["kvops"],
        "args": [
            "index",
            "build",
            "--source",
            source_path,
            "--output",
            INDEX_DIR,
            "--chunk-size",
            str(spec.chunking.size),
            "--chunk-overlap",
            str(spec.chunking.overlap),
            "--embedding",
            spec.embedding.model,
            "--index-type",
            spec.index_type,
            "--metric",
            spec.metric,
        ],
        # The build prints {"documents", "chunks", "dimension"} here for the operator to read.
        "terminationMessagePath": "/dev/termination-log",
        "securityContext": restricted_container_security(),
        "volumeMounts": [
            {"name": "source", "mountPath": SOURCE_DIR, "readOnly": True},
            {"name": "index", "mountPath": INDEX_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": job_metadata,
        "spec": {
            "backoffLimit": 2,
            "template": {
                "metadata": {"labels": child_labels(name, "build")},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": restricted_pod_security(),
                    "containers": [container],
                    "volumes": [
                        volume,
                        {"name": "index", "persistentVolumeClaim": {"claimName": f"{name}-index"}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def render_search(owner: dict[str, Any], spec: VectorIndexSpec) -> list[dict[str, Any]]:
    """The Deployment that serves Search over the built index, and its Service."""
    name = owner["metadata"]["name"]
    selector = {k: v for k, v in child_labels(name, "search").items() if k.startswith("app.")}
    del selector["app.kubernetes.io/managed-by"]
    container = {
        "name": "search",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["kvops"],
        "args": [
            "index",
            "serve",
            "--index",
            INDEX_DIR,
            "--http-port",
            str(HTTP_PORT),
            "--grpc-port",
            str(GRPC_PORT),
        ],
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT},
            {"name": "grpc", "containerPort": GRPC_PORT},
        ],
        "readinessProbe": http_probe("/ready", 5, 3),
        "livenessProbe": http_probe("/health", 10, 3),
        "securityContext": restricted_container_security(),
        "volumeMounts": [
            {"name": "index", "mountPath": INDEX_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(owner, f"{name}-search", "search"),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {
                    "labels": child_labels(name, "search"),
                    # A new build restarts the servers so that they load the new index.
                    "annotations": {"kvops.io/build-hash": build_hash(spec)},
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": restricted_pod_security(),
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "index",
                            "persistentVolumeClaim": {
                                "claimName": f"{name}-index",
                                "readOnly": True,
                            },
                        },
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, f"{name}-search", "search"),
        "spec": {
            "selector": selector,
            "ports": [
                {"name": "http", "port": HTTP_PORT, "targetPort": "http"},
                {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "appProtocol": "grpc"},
            ],
        },
    }
    return [deployment, service]


def render(owner: dict[str, Any], spec: VectorIndexSpec) -> list[dict[str, Any]]:
    children = [render_claim(owner, spec)]
    if spec.source.documents is not None:
        children.append(render_documents_config_map(owner, spec))
    return [*children, render_build_job(owner, spec), *render_search(owner, spec)]


def _seconds_between(start: str, end: str) -> float:
    parse = datetime.datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


def render_status(
    owner: dict[str, Any],
    spec: VectorIndexSpec | None,
    job: dict[str, Any] | None,
    result: dict[str, Any],
    problem: Problem | None = None,
) -> dict[str, Any]:
    """Status from the build Job (None: not created), the figures the build reported (`result`,
    maybe empty) and the first problem with the spec, the children or the pods (None: none)."""
    namespace = owner["metadata"]["namespace"]
    generation = owner["metadata"].get("generation")
    previous = (owner.get("status") or {}).get("conditions") or []
    job_status = (job or {}).get("status") or {}
    job_conditions = {
        c["type"]: c for c in job_status.get("conditions", []) if c["status"] == "True"
    }
    failed = job_conditions.get("Failed")
    if "Complete" in job_conditions:
        phase, reason, message = "Ready", "BuildSucceeded", "the index is built"
    elif failed is not None:
        phase, reason = "Failed", failed.get("reason") or "BuildFailed"
        message = failed.get("message") or "the build Job failed"
    elif problem is not None:
        phase, reason, message = "Failed", problem.reason, problem.message
    elif job_status.get("active") or job_status.get("startTime"):
        phase, reason, message = "Building", "Building", "the build Job is running"
    else:
        phase, reason, message = "Pending", "BuildPending", "the build Job has not started"
    documents = result.get("documents")
    if documents is None and spec is not None and spec.source.documents is not None:
        documents = len(spec.source.documents)
    conditions = [kube.condition(previous, "Ready", phase == "Ready", reason, message, generation)]
    conditions.append(
        kube.condition(
            previous,
            "Degraded",
            problem is not None,
            problem.reason if problem else "AsExpected",
            problem.message if problem else "",
            generation,
        )
    )
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "phase": phase,
        "documents": documents,
        "chunks": result.get("chunks"),
        "dimension": result.get("dimension"),
        "endpoint": f"{owner['metadata']['name']}-search.{namespace}.svc:{GRPC_PORT}",
        "conditions": conditions,
    }
    if spec is not None:
        status["buildHash"] = build_hash(spec)
    completion = job_status.get("completionTime")
    if completion and job_status.get("startTime"):
        status["lastBuildTime"] = completion
        status["buildDurationSeconds"] = _seconds_between(job_status["startTime"], completion)
    return status


def build_result(pods: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON figures a finished build pod left in its termination message, if any."""
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated") or {}
            if terminated.get("exitCode") == 0 and terminated.get("message"):
                try:
                    return dict(json.loads(terminated["message"]))
                except (ValueError, TypeError):
                    continue
    return {}


# ---------------------------------------------------------------------------------------- handlers


def spec_problem(body: dict[str, Any]) -> tuple[VectorIndexSpec | None, Problem | None]:
    message = name_problem("VectorIndex", body["metadata"]["name"])
    if message is not None:
        return None, Problem("InvalidName", message)
    try:
        return VectorIndexSpec.model_validate(body["spec"]), None
    except ValueError as error:
        return None, Problem("InvalidSpec", str(error))


def apply_children(
    body: dict[str, Any], spec: VectorIndexSpec
) -> tuple[dict | None, Problem | None]:
    """Apply the children and drop superseded builds; (the build Job, why not)."""
    name = body["metadata"]["name"]
    namespace = body["metadata"]["namespace"]
    children = render(body, spec)
    problem_text = contract.children_problem(children)
    if problem_text is not None:
        return None, Problem("UnsupportedCommand", problem_text)
    try:
        applied = [kube.apply(child) for child in children]
    except kube.ChildRefused as refusal:
        return None, Problem("ChildRefused", str(refusal))
    job = next(obj for obj in applied if obj["kind"] == "Job")
    for old in kube.list_objects("batch/v1", "Job", namespace, f"kvops.io/vectorindex={name}"):
        if old["metadata"]["name"] != job["metadata"]["name"]:
            kube.delete("batch/v1", "Job", old["metadata"]["name"], namespace)
    return job, None


def reconcile(body: dict[str, Any]) -> None:
    with kube.reconciling(body, "VectorIndex") as current:
        if current is None:
            return
        body = current
        name = body["metadata"]["name"]
        namespace = body["metadata"]["namespace"]
        spec, problem = spec_problem(body)
        job, result = None, {}
        if spec is not None and problem is None:
            job, problem = apply_children(body, spec)
        if job is not None:
            pods = kube.list_objects("v1", "Pod", namespace, f"kvops.io/vectorindex={name}")
            job_name = job["metadata"]["name"]
            result = build_result(
                [p for p in pods if p["metadata"].get("labels", {}).get("job-name") == job_name]
            )
            problem = diagnosis.problem_of(namespace, pods)
        status = render_status(body, spec, job, result, problem)
        if problem is not None and status["phase"] == "Failed":
            kube.warn_on_new_problem(body, "Degraded", problem.reason, problem.message)
        else:
            kube.post_phase_change(
                body,
                status,
                warning=status["phase"] == "Failed",
                reason=status["conditions"][0]["reason"],
            )
        kube.patch_status(body, status)


@kopf.on.resume(API_VERSION, "vectorindexes")
@kopf.on.create(API_VERSION, "vectorindexes")
@kopf.on.update(API_VERSION, "vectorindexes", field="spec")
def on_change(body: kopf.Body, **_: Any) -> None:
    reconcile(kube.plain(body))


@kopf.timer(API_VERSION, "vectorindexes", interval=60, initial_delay=60, idle=30)
def on_timer(body: kopf.Body, **_: Any) -> None:
    reconcile(kube.plain(body))


def reconcile_owner(child: dict[str, Any]) -> None:
    owner = kube.owner_of(child, API_VERSION, "VectorIndex")
    if owner is not None:
        reconcile(owner)


diagnosis.reconcile_on_pod_problems("kvops.io/vectorindex", "VectorIndex", reconcile)


for _group_version, _plural in [
    ("batch/v1", "jobs"),
    ("apps/v1", "deployments"),
    ("v1", "persistentvolumeclaims"),
]:
    kopf.on.event(
        _group_version,
        _plural,
        labels={"kvops.io/vectorindex": kopf.PRESENT},
        id=f"vectorindex-child-{_plural}",
    )(lambda body, **_: reconcile_owner(kube.plain(body)))
