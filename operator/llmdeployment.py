"""LLMDeployment: render the worker's Deployment, Service, prompt ConfigMap, PodDisruptionBudget
and autoscaler from the spec (pure functions), then the kopf handlers that apply them and report
status from the Deployment."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import kopf

from kvops.operator import autoscaling, contract, diagnosis, kube, modelcache
from kvops.operator.api import API_VERSION, LLMDeploymentSpec, name_problem
from kvops.operator.diagnosis import Problem
from kvops.operator.pods import (
    GRPC_PORT,
    HTTP_PORT,
    http_probe,
    restricted_container_security,
    restricted_pod_security,
)
from kvops.operator.prompts import served_prompts

PROMPTS_DIR = "/etc/kvops/prompts"
PROMPTS_FILE = "prompts.json"
# Ratings of answers (POST /v1/feedback) are appended here, on the `feedback` emptyDir: it
# survives container restarts (a crash, an OOM kill), not the pod's deletion.
FEEDBACK_DIR = "/var/lib/kvops/feedback"
FEEDBACK_LOG = f"{FEEDBACK_DIR}/feedback.jsonl"
MODELS_DIR = "/models"
# The root filesystem is read-only: everything the worker writes (kernel and compiler caches,
# downloads) goes to the `cache` emptyDir. The worker image sets the same defaults.
CACHE_DIR = "/cache"
CACHE_ENV = {
    "HOME": f"{CACHE_DIR}/home",
    "XDG_CACHE_HOME": CACHE_DIR,
    "HF_HOME": f"{CACHE_DIR}/huggingface",
    "KVOPS_CACHE_DIR": f"{CACHE_DIR}/kvops",
    "TRITON_CACHE_DIR": f"{CACHE_DIR}/triton",
    "TORCH_EXTENSIONS_DIR": f"{CACHE_DIR}/torch_extensions",
}
# Requests when the spec names none: the built-in model needs about 1.4 GiB resident on the CPU
# plus the engine's 2 GiB CPU KV cache; other models are staged in host memory on their way to
# the GPU.
BUILTIN_REQUESTS = {"cpu": "500m", "memory": "4Gi"}
MODEL_REQUESTS = {"cpu": "2", "memory": "16Gi"}


def selector_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kvops-worker", "app.kubernetes.io/instance": name}


def child_labels(name: str) -> dict[str, str]:
    return {**selector_labels(name), **kube.MANAGED_BY, "kvops.io/llmdeployment": name}


def spec_hash(spec: LLMDeploymentSpec) -> str:
    """Hash of everything that shapes a pod; replicas and autoscaling do not roll pods."""
    shaping = spec.model_dump(mode="json", by_alias=True, exclude={"replicas", "autoscaling"})
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def model_claim(source: str) -> str | None:
    """The claim a pvc:// source reads the model from."""
    if not source.startswith("pvc://"):
        return None
    return source.removeprefix("pvc://").split("/", 1)[0]


def model_argument(source: str) -> str:
    """What `kvops serve --model` gets for a source URI (PVCs are mounted under /models)."""
    if source == "builtin://smollm2":
        return "default"
    if source.startswith("pvc://"):
        return f"{MODELS_DIR}/{source.removeprefix('pvc://')}"
    # hf:// and s3://: the `model-pull` init container has fetched it into the cache volume;
    # the source (pinned once resolved) comes from the `<name>-model` ConfigMap.
    return f"$({modelcache.SOURCE_ENV})"


def engine_arguments(name: str, spec: LLMDeploymentSpec) -> list[str]:
    engine = spec.engine
    args = [
        "serve",
        "--host",
        "0.0.0.0",
        "--served-model-name",
        spec.model.served_name or name,
        "--model",
        model_argument(spec.model.source),
        "--dtype",
        spec.model.dtype,
        "--device",
        "cuda" if spec.gpus else "cpu",
        "--quantization",
        spec.model.quantization,
        "--http-port",
        str(HTTP_PORT),
        "--grpc-port",
        str(GRPC_PORT),
        "--block-size",
        str(engine.block_size),
        "--max-num-seqs",
        str(engine.max_num_seqs),
        "--max-num-batched-tokens",
        str(engine.max_num_batched_tokens),
        "--kv-cache-memory-fraction",
        str(engine.kv_cache_memory_fraction),
    ]
    if engine.max_model_len is not None:
        args += ["--max-model-len", str(engine.max_model_len)]
    if not engine.prefix_caching:
        args.append("--no-prefix-caching")
    if modelcache.is_pulled(spec.model.source):
        args += ["--model-cache", modelcache.CACHE_MOUNT]
    return args


def environment(name: str, namespace: str, spec: LLMDeploymentSpec) -> list[dict[str, Any]]:
    """The operator's variables, then the user's; a user variable of the same name replaces the
    operator's default (the API server would keep duplicates and warn)."""
    user_names = {var.name for var in spec.env}
    env: list[dict[str, Any]] = [
        *({"name": key, "value": value} for key, value in CACHE_ENV.items()),
        {"name": "OTEL_SERVICE_NAME", "value": f"kvops-worker.{name}"},
        {"name": "OTEL_TRACES_SAMPLER", "value": "parentbased_traceidratio"},
        {"name": "OTEL_TRACES_SAMPLER_ARG", "value": str(spec.observability.sampling_ratio)},
        {"name": "KVOPS_FEEDBACK_LOG", "value": FEEDBACK_LOG},
        *modelcache.endpoint_variables(spec),
    ]
    if spec.observability.otlp_endpoint:
        env.append(
            {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": spec.observability.otlp_endpoint}
        )
    if spec.prompts:
        env.append({"name": "KVOPS_PROMPTS_DIR", "value": PROMPTS_DIR})
    if spec.retrieval:
        index = spec.retrieval.vector_index
        env += [
            {
                "name": "KVOPS_VECTOR_INDEX_ADDRESS",
                "value": f"{index}-search.{namespace}.svc:{GRPC_PORT}",
            },
            {"name": "KVOPS_RETRIEVAL_TOP_K", "value": str(spec.retrieval.top_k)},
        ]
    env = [var for var in env if var["name"] not in user_names]
    if modelcache.is_pulled(spec.model.source):
        env.append(modelcache.source_variable(name))
    for var in spec.env:
        if var.secret_key_ref is not None:
            ref = var.secret_key_ref
            source: dict[str, Any] = {"secretKeyRef": {"name": ref.name, "key": ref.key}}
            if ref.optional:
                source["secretKeyRef"]["optional"] = True
            env.append({"name": var.name, "valueFrom": source})
        else:
            env.append({"name": var.name, "value": var.value})
    return env


def compute_resources(spec: LLMDeploymentSpec) -> dict[str, Any]:
    """Requests and limits of the worker container: the spec's, else sized for the model."""
    if spec.resources is not None:
        requests = spec.resources.requests.model_dump(exclude_none=True)
        limits = spec.resources.limits.model_dump(exclude_none=True)
    else:
        builtin = spec.model.source.startswith("builtin://")
        requests = dict(BUILTIN_REQUESTS if builtin else MODEL_REQUESTS)
        limits = {}
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = {key: str(value) for key, value in requests.items()}
    limits = {key: str(value) for key, value in limits.items()}
    if spec.gpus:
        limits["nvidia.com/gpu"] = spec.gpus
    if limits:
        resources["limits"] = limits
    return resources


def rollout_strategy(spec: LLMDeploymentSpec) -> dict[str, Any]:
    """With GPUs, replace pods one at a time without a surge pod: a cluster rarely has a spare
    GPU for it, and the surge pod would sit Pending and stall the rollout."""
    if spec.gpus:
        return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def metadata(owner: dict[str, Any], name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner["metadata"]["namespace"],
        "labels": child_labels(owner["metadata"]["name"]),
        "ownerReferences": [kube.owner_reference(owner)],
    }


def render_deployment(owner: dict[str, Any], spec: LLMDeploymentSpec) -> dict[str, Any]:
    name = owner["metadata"]["name"]
    namespace = owner["metadata"]["namespace"]
    volumes: list[dict[str, Any]] = [
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "feedback", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "cache", "mountPath": "/cache"},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "feedback", "mountPath": FEEDBACK_DIR},
    ]
    if spec.prompts:
        volumes.append({"name": "prompts", "configMap": {"name": f"{name}-prompts"}})
        mounts.append({"name": "prompts", "mountPath": PROMPTS_DIR, "readOnly": True})
    claim = model_claim(spec.model.source)
    if claim is not None:
        volumes.append(
            {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounts.append({"name": "model", "mountPath": f"{MODELS_DIR}/{claim}", "readOnly": True})
    pulled = modelcache.is_pulled(spec.model.source)
    if pulled:
        volumes.append(modelcache.cache_volume(name, spec))
        mounts.append({"name": modelcache.CACHE_VOLUME, "mountPath": modelcache.CACHE_MOUNT})

    node_selector = dict(spec.node_selector)
    if spec.gpu_product:
        node_selector["nvidia.com/gpu.product"] = spec.gpu_product
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations]
    if spec.gpus:
        # GPU nodes are commonly tainted so that only pods asking for GPUs land on them.
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    startup_checks = -(-spec.startup_timeout_seconds // 10)

    container = {
        "name": "worker",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["kvops"],
        "args": engine_arguments(name, spec),
        "env": environment(name, namespace, spec),
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
        ],
        "resources": compute_resources(spec),
        # A worker that exits on a bad model or flag says why in its last log lines; the
        # kubelet keeps them as the termination message, which the status then quotes.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "startupProbe": http_probe("/health", 10, startup_checks),
        "livenessProbe": http_probe("/health", 10, 3),
        "readinessProbe": http_probe("/ready", 5, 3),
        "securityContext": restricted_container_security(),
        "volumeMounts": mounts,
    }
    if modelcache.credentials(spec):
        container["envFrom"] = modelcache.credentials(spec)
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": restricted_pod_security(),
        # The worker drains in-flight requests on SIGTERM.
        "terminationGracePeriodSeconds": 60,
        "containers": [container],
        "volumes": volumes,
    }
    if pulled:
        # The download happens here, before the worker starts: its startup probe times the load.
        pod_spec["initContainers"] = [
            modelcache.pull_container(container, compute_resources(spec), mounts)
        ]
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if spec.affinity:
        pod_spec["affinity"] = spec.affinity
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": ref.name} for ref in spec.image_pull_secrets]
    for field, value in [
        ("serviceAccountName", spec.service_account_name),
        ("priorityClassName", spec.priority_class_name),
        ("runtimeClassName", spec.runtime_class_name),
    ]:
        if value:
            pod_spec[field] = value
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(owner, name),
        "spec": {
            "replicas": spec.replicas,
            "strategy": rollout_strategy(spec),
            # The rollout may take the model's load time and a pull of a large image (and of
            # the model itself: an hour for tens of gigabytes on a slow link).
            "progressDeadlineSeconds": spec.startup_timeout_seconds + 300 + 3600 * pulled,
            "selector": {"matchLabels": selector_labels(name)},
            "template": {
                "metadata": {
                    "labels": child_labels(name),
                    "annotations": {
                        "kvops.io/spec-hash": spec_hash(spec),
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(HTTP_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def render_service(owner: dict[str, Any]) -> dict[str, Any]:
    name = owner["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, name),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name),
            "ports": [
                {"name": "http", "port": HTTP_PORT, "targetPort": "http", "appProtocol": "http"},
                {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "appProtocol": "grpc"},
            ],
        },
    }


def render_prompts_config_map(
    owner: dict[str, Any], spec: LLMDeploymentSpec, versions: list[dict[str, Any]]
) -> dict[str, Any]:
    """One file, `prompts.json`, so that the worker sees a kubelet update whole: for each
    referenced prompt the labels some version holds now and its servable versions, and the
    references no version holds, with why (kvops.operator.prompts.served_prompts).
    `versions` are the namespace's PromptVersion objects."""
    refs = [(ref.name, ref.label) for ref in spec.prompts]
    content = served_prompts(refs, versions)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(owner, f"{owner['metadata']['name']}-prompts"),
        "data": {PROMPTS_FILE: json.dumps(content, indent=1, sort_keys=True)},
    }


def render_disruption_budget(owner: dict[str, Any]) -> dict[str, Any]:
    name = owner["metadata"]["name"]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(owner, name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(name)}},
    }


def render_model_children(
    owner: dict[str, Any], spec: LLMDeploymentSpec, pinned: str
) -> tuple[list[dict[str, Any]], list[tuple[str, str, str]]]:
    """The `<name>-model` ConfigMap (the source pods pull, `pinned` once resolved) and the
    per-deployment cache claim, for hf:// and s3:// sources; else both are deleted."""
    name = owner["metadata"]["name"]
    claim = f"{name}-model-cache"
    apply, delete = [], []
    if modelcache.is_pulled(spec.model.source):
        apply.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": metadata(owner, modelcache.config_map_name(name)),
                "data": {modelcache.SOURCE_KEY: pinned},
            }
        )
    else:
        delete.append(("v1", "ConfigMap", modelcache.config_map_name(name)))
    claim_spec = modelcache.claim_spec(spec) if modelcache.is_pulled(spec.model.source) else None
    if claim_spec is not None:
        apply.append(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": metadata(owner, claim),
                "spec": claim_spec,
            }
        )
    elif claim not in (spec.model.cache.claim_name, model_claim(spec.model.source)):
        delete.append(("v1", "PersistentVolumeClaim", claim))  # a claim the user names stays
    return apply, delete


def render(
    owner: dict[str, Any],
    spec: LLMDeploymentSpec,
    versions: list[dict[str, Any]],
    pinned: str | None = None,
) -> tuple[list[dict[str, Any]], list[tuple[str, str, str]]]:
    """(children to apply, (apiVersion, kind, name) of optional children to delete).
    `pinned`: the model source new pods pull (modelcache.pinned_source), the spec's by default."""
    name = owner["metadata"]["name"]
    # The model's ConfigMap and claim first: the Deployment's pods need them to start.
    apply, delete = render_model_children(owner, spec, pinned or spec.model.source)
    apply += [
        render_deployment(owner, spec),
        render_service(owner),
        render_disruption_budget(owner),
    ]
    if spec.prompts:
        apply.append(render_prompts_config_map(owner, spec, versions))
    else:
        delete.append(("v1", "ConfigMap", f"{name}-prompts"))
    autoscalers, stale_autoscalers = autoscaling.render_autoscaler(
        metadata(owner, name), spec.autoscaling
    )
    apply += autoscalers
    delete += [(api_version, kind, name) for api_version, kind in stale_autoscalers]
    return apply, delete


def deployment_rolled_out(deployment: dict[str, Any], desired: int) -> bool:
    status = deployment.get("status") or {}
    return (
        status.get("observedGeneration", 0) >= deployment["metadata"].get("generation", 1)
        and status.get("updatedReplicas", 0) == desired
        and status.get("replicas", 0) == desired
        and status.get("readyReplicas", 0) == desired
    )


def render_status(
    owner: dict[str, Any],
    spec: LLMDeploymentSpec | None,
    deployment: dict[str, Any] | None,
    problem: Problem | None = None,
    model_cache: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The LLMDeployment's status from its Deployment (None: not created yet), the first
    problem found with the spec, the children or the pods (None: none) and the pulled model's
    cache (modelcache.cache_status; None: left as it is)."""
    name = owner["metadata"]["name"]
    namespace = owner["metadata"]["namespace"]
    generation = owner["metadata"].get("generation")
    previous = (owner.get("status") or {}).get("conditions") or []
    desired = spec.replicas if spec is not None else 0
    deployment_status = (deployment or {}).get("status") or {}
    ready = deployment_status.get("readyReplicas", 0)
    replicas = deployment_status.get("replicas", 0)
    if problem is None:
        stalled = next(
            (
                c
                for c in deployment_status.get("conditions", [])
                if (c["type"] == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded")
                or (c["type"] == "ReplicaFailure" and c["status"] == "True")
            ),
            None,
        )
        if stalled is not None:
            problem = Problem(stalled.get("reason") or "ReplicaFailure", stalled.get("message", ""))
    rolled_out = deployment is not None and deployment_rolled_out(deployment, desired)
    available = ready >= 1

    def cond(type_: str, status: bool, reason: str, message: str) -> dict[str, Any]:
        return kube.condition(previous, type_, status, reason, message, generation)

    if rolled_out:
        progress = ("RolledOut", "all replicas run the current spec")
    elif problem is not None:
        progress = ("Stalled", "see Degraded")
    else:
        progress = ("RollingOut", "waiting for the Deployment's new pods")
    conditions = [
        cond(
            "Available",
            available,
            "MinimumReplicasReady" if available else "NoReplicasReady",
            f"{ready} of {desired} replicas ready",
        ),
        cond("Progressing", not rolled_out and problem is None, *progress),
        cond(
            "Degraded",
            problem is not None,
            problem.reason if problem else "AsExpected",
            problem.message if problem else "",
        ),
    ]
    healthy = rolled_out and problem is None and (available or desired == 0)
    conditions.append(
        cond(
            "Ready",
            healthy,
            "Ready" if healthy else "NotReady",
            "serving with every replica" if healthy else f"{ready} of {desired} replicas ready",
        )
    )
    if problem is not None:
        phase = "Degraded"
    elif not rolled_out:
        phase = "Progressing" if deployment is not None else "Pending"
    else:
        phase = "Available" if available else "Pending"
    status = {
        "observedGeneration": generation,
        "phase": phase,
        "replicas": replicas,
        "readyReplicas": ready,
        "ready": f"{ready}/{desired}",
        "selector": ",".join(f"{k}={v}" for k, v in selector_labels(name).items()),
        "endpoint": f"{name}.{namespace}.svc:{HTTP_PORT}",
        "conditions": conditions,
    }
    if spec is not None:
        status["model"] = spec.model.served_name or spec.model.source
    if model_cache is not None:
        status["modelCache"] = model_cache
    return status


def spec_problem(body: dict[str, Any]) -> tuple[LLMDeploymentSpec | None, Problem | None]:
    """The parsed spec, or why the operator will not render it (checked before any apply)."""
    message = name_problem("LLMDeployment", body["metadata"]["name"])
    if message is not None:
        return None, Problem("InvalidName", message)
    try:
        spec = LLMDeploymentSpec.model_validate(body["spec"])
    except ValueError as error:
        return None, Problem("InvalidSpec", str(error))
    if spec.model.format != "auto":
        return spec, Problem(
            "UnsupportedFormat",
            f"model.format {spec.model.format}: this kvops worker tells the format from the files "
            "(config.json with *.safetensors, or a .gguf file); set format auto",
        )
    return spec, None


def keda_problem(spec: LLMDeploymentSpec) -> Problem | None:
    if (
        spec.autoscaling is None
        or spec.autoscaling.provider != "KEDA"
        or kube.kind_served(*autoscaling.KEDA_API)
    ):
        return None
    return Problem(
        "KedaNotInstalled",
        "autoscaling.provider KEDA: this cluster serves no keda.sh ScaledObject; install KEDA, "
        "or use provider HPA (prometheus-adapter)",
    )


def child_kind_served(child: tuple[str, str, str]) -> bool:
    """Stale children of an add-on's kind cannot exist where the add-on is missing."""
    api_version, kind, _ = child
    return (api_version, kind) != autoscaling.KEDA_API or kube.kind_served(api_version, kind)


# ---------------------------------------------------------------------------------------- handlers


def resolve_prompts(namespace: str, spec: LLMDeploymentSpec) -> list[dict[str, Any]]:
    """The PromptVersions the prompt ConfigMap is rendered from (none without references)."""
    if not spec.prompts:
        return []
    return kube.list_objects(API_VERSION, "PromptVersion", namespace)


def reconcile(body: dict[str, Any]) -> None:
    """Bring the children and the status in line with the spec; safe to repeat at any time."""
    with kube.reconciling(body, "LLMDeployment") as current:
        if current is None:
            return
        body = current
        name = body["metadata"]["name"]
        namespace = body["metadata"]["namespace"]
        spec, problem = spec_problem(body)
        deployment = None
        model_cache = None
        if spec is not None and problem is None:
            selector = ",".join(f"{k}={v}" for k, v in selector_labels(name).items())
            pods = kube.list_objects("v1", "Pod", namespace, selector)
            model_cache = modelcache.cache_status(
                name,
                spec,
                pods,
                (body.get("status") or {}).get("modelCache"),
                lambda pod: kube.pod_log_tail(namespace, pod, modelcache.PULL_CONTAINER),
            )
            pinned = modelcache.pinned_source(spec, model_cache)
            children, stale = render(body, spec, resolve_prompts(namespace, spec), pinned)
            problem_text = contract.children_problem(children)
            if problem_text is not None:
                problem = Problem("UnsupportedCommand", problem_text)
            problem = problem or keda_problem(spec)
            stale = [child for child in stale if child_kind_served(child)]
        if spec is not None and problem is None:
            try:
                applied = {child["kind"]: kube.apply(child) for child in children}
            except kube.ChildRefused as refusal:
                problem = Problem("ChildRefused", str(refusal))
            else:
                deployment = applied["Deployment"]
                for api_version, kind, stale_name in stale:
                    kube.delete(api_version, kind, stale_name, namespace)
                problem = diagnosis.problem_of(namespace, pods)
        if deployment is None:  # nothing applied: report what runs from an earlier spec
            deployment = kube.get("apps/v1", "Deployment", name, namespace)
        status = render_status(body, spec, deployment, problem, model_cache)
        if status["phase"] == "Degraded":
            degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
            kube.warn_on_new_problem(body, "Degraded", degraded["reason"], degraded["message"])
        else:
            kube.post_phase_change(body, status, warning=False, reason=status["phase"])
        kube.patch_status(body, status)


@kopf.on.resume(API_VERSION, "llmdeployments")
@kopf.on.create(API_VERSION, "llmdeployments")
@kopf.on.update(API_VERSION, "llmdeployments", field="spec")
def on_change(body: kopf.Body, **_: Any) -> None:
    reconcile(kube.plain(body))


@kopf.timer(API_VERSION, "llmdeployments", interval=60, initial_delay=60, idle=30)
def on_timer(body: kopf.Body, **_: Any) -> None:
    """Level-based safety net: repairs drift that no watch event reported."""
    reconcile(kube.plain(body))


def reconcile_owner(child: dict[str, Any]) -> None:
    owner = kube.owner_of(child, API_VERSION, "LLMDeployment")
    if owner is not None:
        reconcile(owner)


diagnosis.reconcile_on_pod_problems("kvops.io/llmdeployment", "LLMDeployment", reconcile)


# A child changed (pods became ready) or vanished (someone deleted it): reconcile its owner.
for _group_version, _plural in [
    ("apps/v1", "deployments"),
    ("v1", "services"),
    ("v1", "configmaps"),
    ("policy/v1", "poddisruptionbudgets"),
]:
    kopf.on.event(
        _group_version,
        _plural,
        labels={"kvops.io/llmdeployment": kopf.PRESENT},
        id=f"llmdeployment-child-{_plural}",
    )(lambda body, **_: reconcile_owner(kube.plain(body)))
