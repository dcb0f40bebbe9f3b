"""VectorIndex: each build gets its own claim and Job, named after a hash of everything the build
depends on (so a changed spec, image included, builds anew instead of editing an immutable Job);
the search Deployment is pointed at a build only after its Job completed, and the search pods'
arguments name that exact build directory. The served build is recorded on the Deployment
itself, so the operator reads what runs from the cluster rather than from its own status.

Pure render and status functions first, then the handlers.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import asdict, dataclass
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
TERMINATION_LOG = "/dev/termination-log"
BUILD_LABEL = "kvops.io/build-hash"
SERVED_ANNOTATION = "kvops.io/served-build"
SEARCH_APP = "kvops-index-search"


def child_labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": f"kvops-index-{component}",
        "app.kubernetes.io/instance": name,
        **kube.MANAGED_BY,
        "kvops.io/vectorindex": name,
    }


def build_hash(spec: VectorIndexSpec, source_content: str = "") -> str:
    """Everything a build's Job and claim depend on: what shapes the index, where it is stored,
    the image that builds it (a new image may embed differently) and the content of a source
    ConfigMap (`source_content`, which the spec only names). Replicas do not rebuild."""
    shaping = spec.model_dump(mode="json", by_alias=True, exclude={"replicas"})
    shaping["sourceContent"] = source_content
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:10]


def config_map_content(config_map: dict[str, Any]) -> str:
    """A digest of what a source ConfigMap holds (not of its labels or annotations)."""
    content = {key: config_map.get(key) or {} for key in ("data", "binaryData")}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def claim_name(index: str, build: str) -> str:
    return f"{index}-index-{build}"


def job_name(index: str, build: str) -> str:
    return f"{index}-build-{build}"


def build_dir(build: str) -> str:
    return f"{INDEX_DIR}/{build}"


@dataclass(frozen=True)
class Build:
    """A build whose Job completed: what the search pods run and what the status reports."""

    hash: str
    image: str
    image_pull_policy: str
    access_mode: str
    documents: int | None = None
    chunks: int | None = None
    dimension: int | None = None
    finished: str | None = None
    duration_seconds: float | None = None

    @classmethod
    def of_deployment(cls, deployment: dict[str, Any] | None) -> Build | None:
        """The build a search Deployment serves (None: no Deployment, or not one of ours)."""
        annotations = ((deployment or {}).get("metadata") or {}).get("annotations") or {}
        try:
            return cls(**json.loads(annotations[SERVED_ANNOTATION]))
        except (KeyError, TypeError, ValueError):
            return None


def finished_build(
    spec: VectorIndexSpec, build: str, job: dict[str, Any], result: dict[str, Any]
) -> Build:
    """The Build of a completed Job, with the figures its pod left in the termination message."""
    status = job.get("status") or {}
    start, end = status.get("startTime"), status.get("completionTime")
    duration = _seconds_between(start, end) if start and end else None

    def figure(key: str) -> int | None:
        value = result.get(key)
        return value if isinstance(value, int) else None

    return Build(
        hash=build,
        image=spec.image,
        image_pull_policy=spec.image_pull_policy,
        access_mode=spec.storage.access_mode,
        documents=figure("documents"),
        chunks=figure("chunks"),
        dimension=figure("dimension"),
        finished=end,
        duration_seconds=duration,
    )


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


def render_claim(owner: dict[str, Any], spec: VectorIndexSpec, build: str) -> dict[str, Any]:
    """The claim of the spec's build; a later build gets a claim of its own."""
    claim_spec: dict[str, Any] = {
        "accessModes": [spec.storage.access_mode],
        "resources": {"requests": {"storage": str(spec.storage.size)}},
    }
    if spec.storage.storage_class_name:
        claim_spec["storageClassName"] = spec.storage.storage_class_name
    claim_metadata = metadata(owner, claim_name(owner["metadata"]["name"], build), "storage")
    claim_metadata["labels"][BUILD_LABEL] = build
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": claim_metadata,
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


def render_build_job(owner: dict[str, Any], spec: VectorIndexSpec, build: str) -> dict[str, Any]:
    name = owner["metadata"]["name"]
    volume, source_path = source_volume(owner, spec)
    labels = {**child_labels(name, "build"), BUILD_LABEL: build}
    job_metadata = metadata(owner, job_name(name, build), "build")
    job_metadata["labels"] = labels
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
            # A new directory per build, written atomically (temp sibling + rename) by the CLI.
            "--output",
            build_dir(build),
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
            "--termination-log",
            TERMINATION_LOG,
        ],
        # Success leaves {"documents", "chunks", "dimension", "seconds"} here for the operator;
        # a crash leaves the log's tail, which the status quotes.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": restricted_container_security(),
        "volumeMounts": [
            {"name": "source", "mountPath": SOURCE_DIR, "readOnly": True},
            {"name": "index", "mountPath": INDEX_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": "/cache"},
        ],
    }
    claim = {"claimName": claim_name(name, build)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": job_metadata,
        "spec": {
            "backoffLimit": 2,
            # A build that exits non-zero fails the same way again (bad documents, an
            # unreachable embedder): fail at once and say why; a node going away is retried.
            "podFailurePolicy": {
                "rules": [
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "build",
                            "operator": "NotIn",
                            "values": [0],
                        },
                    },
                ]
            },
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": restricted_pod_security(),
                    "containers": [container],
                    "volumes": [
                        volume,
                        {"name": "index", "persistentVolumeClaim": claim},
                        {"name": "tmp", "emptyDir": {}},
                        {"name": "cache", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def search_selector(name: str) -> dict[str, str]:
    selector = {k: v for k, v in child_labels(name, "search").items() if k.startswith("app.")}
    del selector["app.kubernetes.io/managed-by"]
    return selector


def search_affinity(name: str, build: Build) -> dict[str, Any]:
    """A ReadWriteOnce volume attaches to one node: a build's search pods go together (a local
    volume's node affinity already keeps them there). ReadWriteMany: spread them over nodes."""
    term = {
        "labelSelector": {"matchLabels": {**search_selector(name), BUILD_LABEL: build.hash}},
        "topologyKey": "kubernetes.io/hostname",
    }
    if build.access_mode == "ReadWriteOnce":
        return {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}
    preferred = [{"weight": 100, "podAffinityTerm": term}]
    return {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": preferred}}


def render_search_deployment(owner: dict[str, Any], replicas: int, build: Build) -> dict[str, Any]:
    """The Deployment that serves Search over one finished build (never the spec's build before
    its Job completed)."""
    name = owner["metadata"]["name"]
    labels = {**child_labels(name, "search"), BUILD_LABEL: build.hash}
    container = {
        "name": "search",
        "image": build.image,
        "imagePullPolicy": build.image_pull_policy,
        "command": ["kvops"],
        "args": [
            "index",
            "serve",
            "--index",
            build_dir(build.hash),
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
            {"name": "cache", "mountPath": "/cache"},
        ],
    }
    deployment_metadata = metadata(owner, f"{name}-search", "search")
    deployment_metadata["annotations"] = {SERVED_ANNOTATION: json.dumps(asdict(build))}
    claim = {"claimName": claim_name(name, build.hash), "readOnly": True}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": deployment_metadata,
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": search_selector(name)},
            # The old build's pods answer until the new build's pods are ready.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": restricted_pod_security(),
                    "affinity": search_affinity(name, build),
                    "containers": [container],
                    "volumes": [
                        {"name": "index", "persistentVolumeClaim": claim},
                        {"name": "tmp", "emptyDir": {}},
                        {"name": "cache", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def render_search_service(owner: dict[str, Any]) -> dict[str, Any]:
    """Exists from the start so the endpoint is stable; it has no endpoints before a build."""
    name = owner["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, f"{name}-search", "search"),
        "spec": {
            "selector": search_selector(name),
            "ports": [
                {"name": "http", "port": HTTP_PORT, "targetPort": "http"},
                {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "appProtocol": "grpc"},
            ],
        },
    }


def render(
    owner: dict[str, Any], spec: VectorIndexSpec, build: str, served: Build | None
) -> list[dict[str, Any]]:
    """The children to apply: the spec's build (its claim, the documents, and its Job unless it
    is the build served), the Service, and the search Deployment once some build is served."""
    children = [render_claim(owner, spec, build)]
    if spec.source.documents is not None:
        children.append(render_documents_config_map(owner, spec))
    if served is None or served.hash != build:
        children.append(render_build_job(owner, spec, build))
    children.append(render_search_service(owner))
    if served is not None:
        children.append(render_search_deployment(owner, spec.replicas, served))
    return children


def stale_children(
    index: str,
    wanted_build: str,
    served: Build | None,
    jobs: list[dict[str, Any]],
    claims: list[dict[str, Any]],
    pods: list[dict[str, Any]],
) -> list[tuple[str, str, str]]:
    """(apiVersion, kind, name) of what no longer serves a purpose: every Job but the one still
    building the spec's build, and every claim but the spec's build's, the served build's and
    those live search pods mount (a rollout's old pods, which their ReplicaSet may recreate;
    a claim in use by a terminating pod waits for it, kubernetes.io/pvc-protection)."""
    building = None if served is not None and served.hash == wanted_build else wanted_build
    keep_jobs = {job_name(index, building)} if building else set()
    keep_claims = {claim_name(index, wanted_build)}
    if served is not None:
        keep_claims.add(claim_name(index, served.hash))
    keep_claims |= {
        claim_name(index, _build_of(pod) or "")
        for pod in pods
        if _is_search(pod) and not pod["metadata"].get("deletionTimestamp")
    }
    stale = [
        ("batch/v1", "Job", job["metadata"]["name"])
        for job in jobs
        if job["metadata"]["name"] not in keep_jobs
    ]
    stale += [
        ("v1", "PersistentVolumeClaim", claim["metadata"]["name"])
        for claim in claims
        if claim["metadata"]["name"] not in keep_claims
        and not claim["metadata"].get("deletionTimestamp")
    ]
    return stale


def _seconds_between(start: str, end: str) -> float:
    parse = datetime.datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


def job_condition(job: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for condition in ((job or {}).get("status") or {}).get("conditions") or []:
        if condition["type"] == type_ and condition["status"] == "True":
            return condition
    return None


def build_failure(job: dict[str, Any], pod_problem: Problem | None) -> Problem:
    """Why a failed build Job failed: the Job's words, then the pod's (its log tail)."""
    failed = job_condition(job, "Failed") or {}
    build = job["metadata"].get("labels", {}).get(BUILD_LABEL, "?")
    message = f"build {build}: {failed.get('message') or failed.get('reason') or 'the Job failed'}"
    if pod_problem is not None:
        message += f"; {pod_problem.message}"
    return Problem("BuildFailed", message)


def render_status(
    owner: dict[str, Any],
    spec: VectorIndexSpec | None,
    wanted: str | None,
    job: dict[str, Any] | None,
    served: Build | None,
    deployment: dict[str, Any] | None,
    problem: Problem | None = None,
) -> dict[str, Any]:
    """Status from the spec's build (None: no valid spec) and its Job (None: none, or no longer
    needed), the build the search
    Deployment serves (None: no build finished yet), that Deployment (None: not created) and the
    first problem with the spec, the children, the build or the pods (None: none).

    Ready means the search pods answer (a pod is Ready when the server's /ready is), not that a
    Job finished; while a rebuild runs or after it failed, the served build keeps Ready true."""
    namespace = owner["metadata"]["namespace"]
    generation = owner["metadata"].get("generation")
    previous = (owner.get("status") or {}).get("conditions") or []
    ready_replicas = ((deployment or {}).get("status") or {}).get("readyReplicas", 0)
    answering = served is not None and ready_replicas >= 1
    job_status = (job or {}).get("status") or {}
    job_started = bool(job_status.get("active") or job_status.get("startTime"))

    if problem is not None:
        progress = (False, "Stalled", "see Degraded")
    elif wanted is not None and (served is None or served.hash != wanted):
        progress = (
            (True, "Building", f"build {wanted} is running")
            if job_started
            else (True, "BuildPending", f"build {wanted} has not started")
        )
    elif deployment is not None and not _rolled_out(deployment, spec):
        progress = (True, "RollingOut", "the search pods are moving to the served build")
    else:
        progress = (False, "Served", "the search pods serve the spec's build")

    if served is None:
        ready = (False, "NoBuild", "no build has succeeded yet")
    elif answering:
        ready = (True, "Answering", f"{ready_replicas} search pod(s) serve build {served.hash}")
    elif spec is not None and spec.replicas == 0:
        ready = (False, "NoReplicas", f"build {served.hash} is built; replicas is 0")
    else:
        ready = (False, "NoReadyReplicas", f"no search pod of build {served.hash} is ready")

    if problem is not None:
        phase = "Degraded" if answering else "Failed"
    elif answering:
        phase = "Ready"
    elif served is not None:
        phase = "Built" if spec is not None and spec.replicas == 0 else "Starting"
    else:
        phase = "Building" if job_started else "Pending"

    def cond(type_: str, status: bool, reason: str, message: str) -> dict[str, Any]:
        return kube.condition(previous, type_, status, reason, message, generation)

    status: dict[str, Any] = {
        "observedGeneration": generation,
        "phase": phase,
        "buildHash": wanted,
        "servedBuild": served.hash if served else None,
        "documents": served.documents if served else None,
        "chunks": served.chunks if served else None,
        "dimension": served.dimension if served else None,
        "lastBuildTime": served.finished if served else None,
        "buildDurationSeconds": served.duration_seconds if served else None,
        "readyReplicas": ready_replicas,
        "endpoint": f"{owner['metadata']['name']}-search.{namespace}.svc:{GRPC_PORT}",
        "conditions": [
            cond("Ready", *ready),
            cond("Progressing", *progress),
            cond(
                "Degraded",
                problem is not None,
                problem.reason if problem else "AsExpected",
                problem.message if problem else "",
            ),
        ],
    }
    return status


def _rolled_out(deployment: dict[str, Any], spec: VectorIndexSpec | None) -> bool:
    status = deployment.get("status") or {}
    desired = spec.replicas if spec is not None else 0
    return (
        status.get("observedGeneration", 0) >= deployment["metadata"].get("generation", 1)
        and status.get("updatedReplicas", 0) == desired
        and status.get("replicas", 0) == desired
    )


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


def wanted_build(namespace: str, spec: VectorIndexSpec) -> tuple[str | None, Problem | None]:
    """The spec's build, reading a source ConfigMap's content (a changed ConfigMap builds anew:
    `on_source_change`); or why there is none."""
    if spec.source.config_map is None:
        return build_hash(spec), None
    source = spec.source.config_map.name
    config_map = kube.get("v1", "ConfigMap", source, namespace)
    if config_map is None:
        message = f"source ConfigMap {source} not found in namespace {namespace}"
        return None, Problem("SourceNotFound", message)
    return build_hash(spec, config_map_content(config_map)), None


def converge(
    body: dict[str, Any], spec: VectorIndexSpec, wanted: str, served: Build | None
) -> tuple[dict | None, Build | None, dict | None, Problem | None]:
    """Switch to the spec's build if its Job completed, apply the children, drop what is
    superseded; (the spec's build Job, the served build, the search Deployment, the first
    problem). Nothing changes while a problem stops the apply."""
    name = body["metadata"]["name"]
    namespace = body["metadata"]["namespace"]
    selector = f"kvops.io/vectorindex={name}"
    pods = kube.list_objects("v1", "Pod", namespace, selector)
    job, serving = None, served
    if served is None or served.hash != wanted:
        job = kube.get("batch/v1", "Job", job_name(name, wanted), namespace)
        if job is not None and job_condition(job, "Complete") is not None:
            job_pods = [p for p in pods if _build_of(p) == wanted]
            serving = finished_build(spec, wanted, job, build_result(job_pods))
    children = render(body, spec, wanted, serving)
    problem_text = contract.children_problem(children)
    if problem_text is not None:
        return job, served, None, Problem("UnsupportedCommand", problem_text)
    try:
        applied = {child["kind"]: kube.apply(child) for child in children}
    except kube.ChildRefused as refusal:
        return job, served, None, Problem("ChildRefused", str(refusal))
    job = applied.get("Job")
    jobs = kube.list_objects("batch/v1", "Job", namespace, selector)
    claims = kube.list_objects("v1", "PersistentVolumeClaim", namespace, selector)
    for api_version, kind, stale in stale_children(name, wanted, serving, jobs, claims, pods):
        kube.delete(api_version, kind, stale, namespace)
    problem = diagnosis.problem_of(namespace, [p for p in pods if _current_pod(p, wanted)])
    if job is not None and job_condition(job, "Failed") is not None:
        problem = build_failure(job, problem)
    else:
        problem = diagnosis.stuck_job_problem(problem)
    return job, serving, applied.get("Deployment"), problem


def reconcile(body: dict[str, Any]) -> None:
    """Build the spec's index unless it is the one served, point the search Deployment at it once
    its Job completed, and report; safe to repeat at any time."""
    with kube.reconciling(body, "VectorIndex") as current:
        if current is None:
            return
        body = current
        name = body["metadata"]["name"]
        namespace = body["metadata"]["namespace"]
        deployment = kube.get("apps/v1", "Deployment", f"{name}-search", namespace)
        served = Build.of_deployment(deployment)
        spec, problem = spec_problem(body)
        wanted, job = None, None
        if spec is not None and problem is None:
            wanted, problem = wanted_build(namespace, spec)
        if spec is not None and wanted is not None:
            job, served, applied, problem = converge(body, spec, wanted, served)
            deployment = applied or deployment
        status = render_status(body, spec, wanted, job, served, deployment, problem)
        if problem is not None:
            kube.warn_on_new_problem(body, "Degraded", problem.reason, problem.message)
        else:
            kube.post_phase_change(body, status, warning=False, reason=status["phase"])
        kube.patch_status(body, status)


def _build_of(pod: dict[str, Any]) -> str | None:
    return pod["metadata"].get("labels", {}).get(BUILD_LABEL)


def _is_search(pod: dict[str, Any]) -> bool:
    return pod["metadata"].get("labels", {}).get("app.kubernetes.io/name") == SEARCH_APP


def _current_pod(pod: dict[str, Any], wanted: str) -> bool:
    """Search pods, and the pods of the spec's build (a superseded build's pods are on their way
    out and say nothing about this index)."""
    return _is_search(pod) or _build_of(pod) == wanted


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


@kopf.index(API_VERSION, "vectorindexes")
def source_config_maps(body: kopf.Body, **_: Any) -> dict[tuple[str, str], str] | None:
    """(namespace, ConfigMap) -> the VectorIndexes that read their documents from it."""
    source = ((body.get("spec") or {}).get("source") or {}).get("configMap") or {}
    if not isinstance(source.get("name"), str):
        return None
    return {(body["metadata"]["namespace"], source["name"]): body["metadata"]["name"]}


@kopf.on.event("v1", "configmaps")
def on_source_change(body: kopf.Body, **kwargs: Any) -> None:
    """A source ConfigMap created, edited or deleted: its VectorIndexes build anew or say so."""
    readers: kopf.Index = kwargs["source_config_maps"]  # kopf passes indexes by name
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    for index in readers.get((namespace, name), []):
        owner = kube.get(API_VERSION, "VectorIndex", index, namespace)
        if owner is not None:
            reconcile(owner)


# A Job completed or failed, the search pods became ready, a claim bound or was deleted.
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
