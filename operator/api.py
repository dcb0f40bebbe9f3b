"""The three kvops.io resources as pydantic models, and what a CRD says about each kind.

The models are the one definition of each resource: the operator parses objects with them and
kvops.operator.crd turns them into CustomResourceDefinitions. Rules the schema cannot express
are CEL rules (`x-kubernetes-validations`), mirrored by pydantic validators so that the
operator's own parse fails the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

GROUP = "kvops.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# A DNS-1123 label (names of Services, Deployments, our resources) and subdomain (Secrets, ...).
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
SUBDOMAIN_PATTERN = r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$"
# hf://org/name@revision, pvc://claim/path, s3://bucket/prefix, builtin://smollm2
MODEL_SOURCE_PATTERN = (
    r"^(hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/[^\s]+"
    r"|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?"
    r"|builtin://smollm2)$"
)
# A DNS-1035 label: what a Service's name must be (a letter first).
SERVICE_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# A label key (optional DNS-subdomain prefix and '/', then a name) and a label value.
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# A resource.Quantity such as 10Gi or 500M (or a plain number of bytes).
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"
CPU_PATTERN = r"^[0-9]+(\.[0-9]+)?m?$"
# The images `make images` builds and tags (e2e/images): an LLMDeployment that names no image
# runs the worker image of this release.
RELEASE = "0.1.0"
DEFAULT_IMAGE = f"ghcr.io/kvops/kvops-worker:{RELEASE}"
OPERATOR_IMAGE = f"ghcr.io/kvops/kvops-operator:{RELEASE}"
# Environment variables the operator sets itself to wire the worker to its volumes and peers.
RESERVED_ENV = (
    "KVOPS_PROMPTS_DIR",
    "KVOPS_VECTOR_INDEX_ADDRESS",
    "KVOPS_RETRIEVAL_TOP_K",
    "KVOPS_MODEL_SOURCE",
)


class Spec(BaseModel):
    """camelCase on the wire as Kubernetes expects; unknown fields are an error."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Condition(Spec):
    """A metav1.Condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    message: str = Field("", max_length=32768)
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"})
    observed_generation: int | None = Field(None, ge=0)


class StatusBase(Spec):
    observed_generation: int | None = Field(None, ge=0)
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


# ---------------------------------------------------------------------------------- LLMDeployment


class ModelCache(Spec):
    """Where hf:// and s3:// models are pulled to (kvops.operator.modelcache). By default a
    claim per LLMDeployment, `<name>-model-cache`, shared by its replicas; `claimName` shares an
    existing claim between every LLMDeployment that names it (one pull per revision); `emptyDir`
    pulls into each pod (nothing to provision, every pod downloads)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.claimName) && has(self.emptyDir) && self.emptyDir)",
                    "message": "set at most one of claimName and emptyDir",
                }
            ]
        }
    )

    claim_name: str | None = Field(
        None,
        pattern=SUBDOMAIN_PATTERN,
        max_length=253,
        description="An existing PersistentVolumeClaim to share (ReadWriteMany to span nodes)",
    )
    empty_dir: bool = Field(False, description="Pull into each pod's own emptyDir")
    size: int | str = Field(
        "100Gi",
        json_schema_extra={"pattern": QUANTITY_PATTERN},
        description="Size of the per-deployment claim",
    )
    storage_class_name: str | None = Field(None, max_length=253)
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany"] = Field(
        "ReadWriteOnce",
        description="Of the per-deployment claim: ReadWriteMany lets replicas on several nodes "
        "share it",
    )

    @model_validator(mode="after")
    def _one_place(self) -> ModelCache:
        if self.claim_name and self.empty_dir:
            raise ValueError("model.cache: set at most one of claimName and emptyDir")
        return self


class ModelSource(Spec):
    source: str = Field(
        pattern=MODEL_SOURCE_PATTERN,
        max_length=512,
        description="hf://org/name@revision, pvc://claim/path, s3://bucket/prefix or "
        "builtin://smollm2",
    )
    format: Literal["auto", "safetensors", "gguf"] = Field(
        "auto", description="This release tells the format from the files: other values are refused"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    quantization: Literal["none", "q8_0", "q4_0", "q4_1", "int8"] = Field(
        "none",
        description="Weight format (the worker's --quantization): none runs weights in dtype; a "
        "GGUF file's own block format keeps its weights quantized; a safetensors model is "
        "quantized at load to any of them. A format the file cannot give stops the worker with "
        "an error naming both",
    )
    served_name: str | None = Field(
        None, max_length=253, description="The model name clients send; the resource's by default"
    )
    cache: ModelCache = Field(default_factory=ModelCache)
    credentials_secret: str | None = Field(
        None,
        pattern=SUBDOMAIN_PATTERN,
        max_length=253,
        description="A Secret whose keys become the pull's and the worker's environment: "
        "HF_TOKEN for hf://, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN, "
        "AWS_REGION) for s3://",
    )
    endpoint: str | None = Field(
        None,
        pattern=r"^https?://[^\s]+$",
        max_length=512,
        description="HF_ENDPOINT for hf://, AWS_ENDPOINT_URL for s3:// (a mirror, MinIO, ...)",
    )


class EngineSettings(Spec):
    block_size: Literal[8, 16, 32, 64, 128] = Field(16, description="Tokens per KV-cache block")
    max_num_seqs: int = Field(64, ge=1, le=4096)
    max_model_len: int | None = Field(None, ge=16, le=1048576)
    max_num_batched_tokens: int = Field(2048, ge=16, le=1048576)
    kv_cache_memory_fraction: float = Field(0.9, ge=0.05, le=0.99)
    prefix_caching: bool = True


class Toleration(Spec):
    """A pod toleration; the rules are the API server's own for pods, checked at admission so a
    bad one is refused here instead of by every Deployment apply."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "(has(self.key) && self.key != '') || self.operator == 'Exists'",
                    "message": "a toleration without a key must use operator Exists",
                    "fieldPath": ".operator",
                },
                {
                    "rule": "self.operator != 'Exists' || !has(self.value) || self.value == ''",
                    "message": "a toleration with operator Exists takes no value",
                    "fieldPath": ".value",
                },
            ]
        }
    )

    key: str | None = Field(None, pattern=f"^$|{LABEL_KEY_PATTERN}", max_length=316)
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = Field(None, pattern=LABEL_VALUE_PATTERN, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if not self.key and self.operator != "Exists":
            raise ValueError("a toleration without a key must use operator Exists")
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists takes no value")
        return self


# The forms of autoscaling.target, per metric: a count of waiting requests per pod, or a fraction
# of the KV cache as a percentage ("80%") or a ratio ("0.8"). One pattern each, shared by the CEL
# rules and their pydantic mirrors.
QUEUE_TARGET_PATTERN = r"^[1-9][0-9]{0,3}$"
KV_TARGET_PATTERN = r"^(([1-9][0-9]?|100)%|0?\.[0-9]{0,2}[1-9]|1(\.0{1,3})?)$"
QUEUE_TARGET_MESSAGE = (
    "for metric queueDepth, target is a count of waiting requests per pod from 1 to 9999, such as 4"
)
KV_TARGET_MESSAGE = (
    "for metric kvCacheUsage, target is a fraction of the KV cache: a percentage such as '80%' "
    "or a ratio such as '0.8' (a quoted string)"
)
SCALE_TO_ZERO_MESSAGE = (
    "minReplicas 0 (scale to zero) needs provider KEDA: an HPA never scales to zero, and kvops "
    "has no activator of its own (docs/architecture.md, Autoscaling)"
)


class Autoscaling(Spec):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.minReplicas <= self.maxReplicas",
                    "message": "minReplicas must not exceed maxReplicas",
                    "fieldPath": ".minReplicas",
                },
                {
                    "rule": "self.minReplicas >= 1 || self.provider == 'KEDA'",
                    "message": SCALE_TO_ZERO_MESSAGE,
                    "fieldPath": ".minReplicas",
                },
                {
                    "rule": "self.metric != 'queueDepth' || !has(self.target) || "
                    "(type(self.target) == int ? self.target >= 1 && self.target <= 9999 : "
                    f"string(self.target).matches(r'{QUEUE_TARGET_PATTERN}'))",
                    "message": QUEUE_TARGET_MESSAGE,
                    "fieldPath": ".target",
                },
                {
                    "rule": "self.metric != 'kvCacheUsage' || !has(self.target) || "
                    "(type(self.target) == string && "
                    f"string(self.target).matches(r'{KV_TARGET_PATTERN}'))",
                    "message": KV_TARGET_MESSAGE,
                    "fieldPath": ".target",
                },
            ]
        }
    )

    min_replicas: int = Field(
        1, ge=0, le=1000, description="0 (scale to zero) only with provider KEDA"
    )
    max_replicas: int = Field(ge=1, le=1000)
    metric: Literal["queueDepth", "kvCacheUsage"] = "queueDepth"
    target: int | str | None = Field(
        None,
        description="Average per pod: for queueDepth a count of waiting requests (default 8), "
        "for kvCacheUsage a percentage such as '80%' or a ratio such as '0.8' (default '80%')",
        json_schema_extra={"maxLength": 8},
    )
    provider: Literal["HPA", "KEDA"] = Field(
        "HPA",
        description="HPA: a HorizontalPodAutoscaler reading the worker gauges through "
        "custom.metrics.k8s.io (prometheus-adapter); KEDA: a keda.sh ScaledObject querying "
        "Prometheus, which allows minReplicas 0",
    )
    scale_down_stabilization_seconds: int = Field(
        300,
        ge=0,
        le=3600,
        description="How long the metric must stay low before replicas are removed",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.minReplicas must not exceed maxReplicas")
        if self.min_replicas == 0 and self.provider != "KEDA":
            raise ValueError(f"autoscaling: {SCALE_TO_ZERO_MESSAGE}")
        if self.target is None:
            return self
        if self.metric == "queueDepth" and not (
            (type(self.target) is int and 1 <= self.target <= 9999)
            or (isinstance(self.target, str) and re.match(QUEUE_TARGET_PATTERN, self.target))
        ):
            raise ValueError(f"autoscaling.target {self.target!r}: {QUEUE_TARGET_MESSAGE}")
        if self.metric == "kvCacheUsage" and not (
            isinstance(self.target, str) and re.match(KV_TARGET_PATTERN, self.target)
        ):
            raise ValueError(f"autoscaling.target {self.target!r}: {KV_TARGET_MESSAGE}")
        return self


class SecretKeyRef(Spec):
    name: str = Field(pattern=SUBDOMAIN_PATTERN, max_length=253)
    key: str = Field(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)
    optional: bool = Field(
        False, description="Start the pod without the variable when the Secret or key is missing"
    )


class EnvVar(Spec):
    """A plain value or a reference to a Secret's key (secrets are never copied into objects)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.value) != has(self.secretKeyRef)",
                    "message": "set exactly one of value and secretKeyRef",
                }
            ]
        }
    )

    name: str = Field(
        pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$",
        max_length=253,
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"!(self in {list(RESERVED_ENV)})",
                    "message": "this variable is set by the operator",
                }
            ]
        },
    )
    value: str | None = Field(None, max_length=32768)
    secret_key_ref: SecretKeyRef | None = None

    @model_validator(mode="after")
    def _one_source(self) -> EnvVar:
        if (self.value is None) == (self.secret_key_ref is None):
            raise ValueError(f"env {self.name}: set exactly one of value and secretKeyRef")
        if self.name in RESERVED_ENV:
            raise ValueError(f"env {self.name}: this variable is set by the operator")
        return self


class ResourceList(Spec):
    cpu: int | str | None = Field(None, json_schema_extra={"pattern": CPU_PATTERN})
    memory: int | str | None = Field(None, json_schema_extra={"pattern": QUANTITY_PATTERN})


class ComputeResources(Spec):
    """CPU and memory of each worker pod; GPUs come from `gpus`."""

    requests: ResourceList = Field(default_factory=ResourceList)
    limits: ResourceList = Field(default_factory=ResourceList)


class LocalObjectReference(Spec):
    name: str = Field(pattern=SUBDOMAIN_PATTERN, max_length=253)


class PromptRef(Spec):
    name: str = Field(pattern=NAME_PATTERN, max_length=63, description="The prompt's name")
    label: str = Field("production", pattern=NAME_PATTERN, max_length=63)


class Retrieval(Spec):
    vector_index: str = Field(pattern=NAME_PATTERN, max_length=63)
    top_k: int = Field(4, ge=1, le=100)


class Observability(Spec):
    otlp_endpoint: str | None = Field(None, pattern=r"^https?://[^\s]+$", max_length=512)
    sampling_ratio: float = Field(0.1, ge=0.0, le=1.0)


class LLMDeploymentSpec(Spec):
    model: ModelSource
    engine: EngineSettings = Field(default_factory=EngineSettings)
    replicas: int = Field(1, ge=0, le=1000)
    gpus: int = Field(1, ge=0, le=16, description="GPUs per replica (nvidia.com/gpu)")
    gpu_product: str | None = Field(
        None,
        pattern=LABEL_VALUE_PATTERN,
        max_length=63,
        description="Required value of the nvidia.com/gpu.product node label",
    )
    node_selector: dict[str, Annotated[str, Field(pattern=LABEL_VALUE_PATTERN, max_length=63)]] = (
        Field(
            default_factory=dict,
            max_length=32,
            json_schema_extra={
                "x-kubernetes-validations": [
                    {
                        "rule": "self.all(k, k.size() <= 316 && "
                        f"k.matches(r'{LABEL_KEY_PATTERN}'))",
                        "message": "node selector keys must be label keys such as "
                        "example.com/gpu-class",
                    }
                ]
            },
        )
    )

    @field_validator("node_selector")
    @classmethod
    def _label_keys(cls, selector: dict[str, str]) -> dict[str, str]:
        for key in selector:
            if len(key) > 316 or not re.match(LABEL_KEY_PATTERN, key):
                raise ValueError(f"nodeSelector key {key!r} is not a label key")
        return selector

    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    affinity: dict[str, Any] | None = Field(
        None, description="The worker pods' affinity, as in a pod spec"
    )
    resources: ComputeResources | None = Field(
        None,
        description="CPU and memory per worker pod; by default requests sized for the model",
    )
    autoscaling: Autoscaling | None = None
    image: str = Field(DEFAULT_IMAGE, min_length=1, max_length=512)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list, max_length=16)
    service_account_name: str | None = Field(None, pattern=SUBDOMAIN_PATTERN, max_length=253)
    priority_class_name: str | None = Field(None, pattern=SUBDOMAIN_PATTERN, max_length=253)
    runtime_class_name: str | None = Field(None, pattern=SUBDOMAIN_PATTERN, max_length=253)
    startup_timeout_seconds: int = Field(
        600,
        ge=30,
        le=86400,
        description="How long a worker may take to load its model before it counts as failed",
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    prompts: list[PromptRef] = Field(default_factory=list, max_length=32)
    retrieval: Retrieval | None = None
    observability: Observability = Field(default_factory=Observability)

    @model_validator(mode="after")
    def _unique_env(self) -> LLMDeploymentSpec:
        names = [var.name for var in self.env]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"env: duplicate names {duplicates}")
        return self


class ModelCacheStatus(Spec):
    """The pulled model (hf://, s3://) as the pods' `model-pull` init containers report it."""

    source: str | None = Field(None, description="The spec's source this describes")
    revision: str | None = Field(
        None,
        description="The commit (hf://) or listing digest (s3://) the pull resolved; every pod "
        "created since loads exactly this revision",
    )
    state: Literal["Pending", "Pulling", "Ready", "Failed"] | None = None
    volume: str | None = Field(None, description="Where the cache lives")
    bytes: int | None = Field(None, ge=0, description="The model's size")
    files: int | None = Field(None, ge=0)
    bytes_done: int | None = Field(None, ge=0, description="While Pulling")
    progress: str | None = Field(None, description="The pull's last progress line")
    message: str | None = Field(None, description="Why the pull failed")


class LLMDeploymentStatus(StatusBase):
    phase: Literal["Pending", "Progressing", "Available", "Degraded"] | None = None
    replicas: int | None = Field(None, ge=0)
    ready_replicas: int | None = Field(None, ge=0)
    ready: str | None = Field(None, description="ready/desired replicas, for kubectl get")
    selector: str | None = Field(None, description="Label selector of the pods (scale subresource)")
    endpoint: str | None = None
    model: str | None = None
    model_cache: ModelCacheStatus | None = None


# ---------------------------------------------------------------------------------- PromptVersion


class ChatMessage(Spec):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=32768, description="A Jinja template over the variables")


class PromptVariable(Spec):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=63)
    required: bool = True
    default: str | None = Field(None, max_length=32768)
    description: str | None = Field(None, max_length=1024)


class ModelParameters(Spec):
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1, le=1048576)
    stop: list[str] = Field(default_factory=list, max_length=16)


ASSERTION_KINDS = (
    "equals",
    "contains",
    "notContains",
    "regex",
    "jsonSchema",
    "maxLatencyMs",
    "maxTokens",
)


class Assertion(Spec):
    """One check of an evaluation answer: set exactly one field."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.equals), has(self.contains), has(self.notContains), "
                    "has(self.regex), has(self.jsonSchema), has(self.maxLatencyMs), "
                    "has(self.maxTokens)].filter(x, x).size() == 1",
                    "message": f"set exactly one of {', '.join(ASSERTION_KINDS)}",
                }
            ]
        }
    )

    equals: str | None = Field(
        None, max_length=32768, description="The whole answer, surrounding whitespace aside"
    )
    contains: str | None = Field(None, max_length=32768)
    not_contains: str | None = Field(None, max_length=32768)
    regex: str | None = Field(
        None, max_length=1024, description="A Python regular expression searched in the answer"
    )
    json_schema: dict[str, Any] | None = Field(
        None,
        description="The whole answer is JSON that this JSON Schema (draft 2020-12 unless "
        "$schema says otherwise) accepts",
    )
    max_latency_ms: int | None = Field(
        None, ge=1, le=3_600_000, description="The request's round trip, in milliseconds"
    )
    max_tokens: int | None = Field(
        None, ge=1, le=1048576, description="Completion tokens, as the response's usage counts them"
    )

    @model_validator(mode="after")
    def _one_check(self) -> Assertion:
        dumped = self.model_dump(by_alias=True, exclude_none=True)
        if len(dumped) != 1:
            raise ValueError(f"an assertion sets exactly one of {', '.join(ASSERTION_KINDS)}")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as error:
                raise ValueError(f"regex {self.regex!r}: {error}") from None
        if self.json_schema is not None:
            # Imported here: only specs with a jsonSchema assertion pay for it, not every command.
            import jsonschema

            try:
                jsonschema.validators.validator_for(self.json_schema).check_schema(self.json_schema)
            except jsonschema.SchemaError as error:
                raise ValueError(
                    f"jsonSchema is not a valid JSON Schema: {error.message}"
                ) from None
        return self


class EvaluationCase(Spec):
    inputs: dict[str, str] = Field(default_factory=dict)
    expect: list[Assertion] = Field(default_factory=list, max_length=32)


class EvaluationGate(Spec):
    min_pass_rate: float = Field(
        ge=0.0,
        le=1.0,
        description="The share of cases that must pass before this version may hold a label",
    )


class Evaluation(Spec):
    llm_deployment: str = Field(
        pattern=NAME_PATTERN, max_length=63, description="The LLMDeployment the dataset runs on"
    )
    dataset: list[EvaluationCase] = Field(min_length=1, max_length=1000)
    gate: EvaluationGate | None = Field(
        None,
        description="Hold labels only after the last evaluation of this content passed",
    )


def _immutable(field: str) -> dict[str, Any]:
    """A transition rule: `field` keeps its value (present or absent) once created."""
    return {
        "rule": f"has(self.{field}) == has(oldSelf.{field}) && "
        f"(!has(self.{field}) || self.{field} == oldSelf.{field})",
        "message": f"{field} is immutable: create a new PromptVersion instead",
        "fieldPath": f".{field}",
    }


class PromptVersionSpec(Spec):
    """A version's identity (prompt name, version, template, variables, model parameters) never
    changes once created; labels and the evaluation stay editable."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _immutable("promptName"),
                _immutable("version"),
                _immutable("variables"),
                _immutable("modelParameters"),
            ]
        }
    )

    prompt_name: str = Field(pattern=NAME_PATTERN, max_length=63)
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=63)
    template: list[ChatMessage] = Field(
        min_length=1,
        max_length=32,
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self == oldSelf",
                    "message": "template is immutable: create a new PromptVersion instead",
                }
            ]
        },
    )
    variables: list[PromptVariable] = Field(default_factory=list, max_length=64)
    model_parameters: ModelParameters = Field(default_factory=ModelParameters)
    labels: list[Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]] = Field(
        default_factory=list,
        max_length=16,
        description="Labels such as production or canary this version asks for; the newest "
        "valid version that lists a label (and passed its gate) holds it: see status.heldLabels",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    evaluation: Evaluation | None = None


class EvaluationResult(Spec):
    time: str = Field(json_schema_extra={"format": "date-time"})
    target: str
    content_hash: str = Field(description="The content the evaluation ran on")
    job: str | None = Field(None, description="The Job that ran it")
    pass_rate: float = Field(ge=0.0, le=1.0)
    passed: int = Field(ge=0)
    failed: int = Field(ge=0)
    failures: list[str] = Field(default_factory=list, description="The first failed cases")


class LabelNotHeld(Spec):
    label: str
    reason: str


class PromptVersionStatus(StatusBase):
    valid: bool | None = None
    error: str | None = None
    content_hash: str | None = None
    held_labels: list[str] = Field(
        default_factory=list, description="The labels of spec.labels this version holds now"
    )
    labels_not_held: list[LabelNotHeld] = Field(
        default_factory=list, description="The labels of spec.labels it does not hold, and why"
    )
    used_by: list[str] = Field(
        default_factory=list, description="LLMDeployments whose prompt label resolves to it"
    )
    last_evaluation: EvaluationResult | None = None


# ------------------------------------------------------------------------------------ VectorIndex


class ConfigMapSource(Spec):
    name: str = Field(pattern=NAME_PATTERN, max_length=253)


class PvcSource(Spec):
    claim_name: str = Field(pattern=NAME_PATTERN, max_length=253)
    path: str = Field("/", max_length=4096)


class Document(Spec):
    id: str = Field(max_length=253)
    text: str = Field(max_length=1048576)


class IndexSource(Spec):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.configMap), has(self.pvc), has(self.documents)]"
                    ".filter(x, x).size() == 1",
                    "message": "set exactly one of configMap, pvc and documents",
                }
            ]
        }
    )

    config_map: ConfigMapSource | None = None
    pvc: PvcSource | None = None
    documents: list[Document] | None = Field(None, max_length=1000)

    @model_validator(mode="after")
    def _one_source(self) -> IndexSource:
        if [self.config_map, self.pvc, self.documents].count(None) != 2:
            raise ValueError("source: set exactly one of configMap, pvc and documents")
        return self


class Chunking(Spec):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.overlap < self.size",
                    "message": "chunking.overlap must be smaller than chunking.size",
                    "fieldPath": ".overlap",
                }
            ]
        }
    )

    size: int = Field(512, ge=16, le=8192, description="Tokens per chunk")
    overlap: int = Field(64, ge=0, le=8192)

    @model_validator(mode="after")
    def _overlap(self) -> Chunking:
        if self.overlap >= self.size:
            raise ValueError("chunking.overlap must be smaller than chunking.size")
        return self


class Embedding(Spec):
    model: str = Field(
        "builtin://minilm",
        pattern=r"^(builtin://minilm|llmd://[a-z0-9]([-a-z0-9]*[a-z0-9])?)$",
        description="builtin://minilm or llmd://<LLMDeployment name>",
    )


class Storage(Spec):
    """One claim per build (kvops.operator.vectorindex): the build Job writes it, the search pods
    mount it read-only once the build succeeded."""

    size: int | str = Field(
        "1Gi", json_schema_extra={"pattern": QUANTITY_PATTERN}, description="Size of each build"
    )
    storage_class_name: str | None = Field(None, max_length=253)
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany"] = Field(
        "ReadWriteOnce",
        description="ReadWriteOnce keeps a build's search pods on one node; ReadWriteMany "
        "(a storage class that offers it, such as NFS or CephFS) spreads them over nodes",
    )


class VectorIndexSpec(Spec):
    source: IndexSource
    chunking: Chunking = Field(default_factory=Chunking)
    embedding: Embedding = Field(default_factory=Embedding)
    index_type: Literal["flat", "ivf"] = "flat"
    metric: Literal["cosine", "dot", "l2"] = "cosine"
    storage: Storage = Field(default_factory=Storage)
    replicas: int = Field(1, ge=0, le=100)
    image: str = Field(DEFAULT_IMAGE, min_length=1, max_length=512)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class VectorIndexStatus(StatusBase):
    phase: (
        Literal["Pending", "Building", "Starting", "Ready", "Built", "Degraded", "Failed"] | None
    ) = None
    # The build the spec asks for, and the one the search pods serve (they differ while a
    # rebuild runs or after it failed); the figures are the served build's.
    build_hash: str | None = None
    served_build: str | None = None
    documents: int | None = Field(None, ge=0)
    chunks: int | None = Field(None, ge=0)
    dimension: int | None = Field(None, ge=0)
    last_build_time: str | None = Field(None, json_schema_extra={"format": "date-time"})
    build_duration_seconds: float | None = Field(None, ge=0)
    ready_replicas: int | None = Field(None, ge=0)
    endpoint: str | None = None


# ------------------------------------------------------------------------------------------- CRDs


@dataclass(frozen=True)
class Resource:
    """What a CRD says about one kind besides its schema."""

    kind: str
    plural: str
    short_name: str
    spec: type[Spec]
    status: type[Spec]
    columns: list[dict[str, Any]]
    # The longest object name whose children's names and labels the API server still accepts;
    # None: any name the API server takes for the kind itself.
    max_name_length: int | None = None
    scale: bool = False

    @property
    def name(self) -> str:
        return f"{self.plural}.{GROUP}"

    def name_rule(self) -> dict[str, str] | None:
        """The CEL rule on metadata.name that keeps every child's name and labels valid."""
        if self.max_name_length is None:
            return None
        return {
            "rule": f"self.metadata.name.size() <= {self.max_name_length} && "
            f"self.metadata.name.matches(r'{SERVICE_NAME_PATTERN}')",
            "message": f"metadata.name must start with a letter, hold only lowercase letters, "
            f"digits and '-', and be at most {self.max_name_length} characters: it names "
            f"the {self.kind}'s Service and labels its pods",
        }


def name_problem(kind: str, name: str) -> str | None:
    """Why the API server would refuse this object's children (the CEL rule's own check, for
    objects created before the CRD carried it)."""
    resource = RESOURCE_BY_KIND[kind]
    rule = resource.name_rule()
    if rule is None or resource.max_name_length is None:
        return None
    if len(name) <= resource.max_name_length and re.match(SERVICE_NAME_PATTERN, name):
        return None
    return rule["message"]


def _column(name: str, path: str, type_: str = "string", priority: int = 0) -> dict[str, Any]:
    column: dict[str, Any] = {"name": name, "type": type_, "jsonPath": path}
    if priority:
        column["priority"] = priority
    return column


AGE = _column("Age", ".metadata.creationTimestamp", "date")
RESOURCES = [
    Resource(
        kind="LLMDeployment",
        plural="llmdeployments",
        short_name="llmd",
        spec=LLMDeploymentSpec,
        status=LLMDeploymentStatus,
        scale=True,
        # The Service is named after it (a DNS-1035 label) and pods carry it as a label value.
        max_name_length=63,
        columns=[
            _column("Ready", ".status.ready"),
            _column("Endpoint", ".status.endpoint"),
            _column("Model", ".spec.model.source"),
            _column("Phase", ".status.phase"),
            _column("Cache", ".status.modelCache.state", priority=1),
            _column("Revision", ".status.modelCache.revision", priority=1),
            AGE,
        ],
    ),
    Resource(
        kind="PromptVersion",
        plural="promptversions",
        short_name="pver",
        spec=PromptVersionSpec,
        status=PromptVersionStatus,
        columns=[
            _column("Prompt", ".spec.promptName"),
            _column("Version", ".spec.version"),
            _column("Holds", ".status.heldLabels"),
            _column("Valid", ".status.valid", "boolean"),
            _column("Labels", ".spec.labels", priority=1),
            _column("Hash", ".status.contentHash", priority=1),
            AGE,
        ],
    ),
    Resource(
        kind="VectorIndex",
        plural="vectorindexes",
        short_name="vidx",
        spec=VectorIndexSpec,
        status=VectorIndexStatus,
        # Build Jobs are "<name>-build-<10-char hash>" and their pods carry that as a label value.
        max_name_length=46,
        columns=[
            _column("Phase", ".status.phase"),
            _column("Served", ".status.servedBuild"),
            _column("Documents", ".status.documents", "integer"),
            _column("Chunks", ".status.chunks", "integer"),
            _column("Dimension", ".status.dimension", "integer"),
            AGE,
        ],
    ),
]
RESOURCE_BY_KIND = {resource.kind: resource for resource in RESOURCES}
