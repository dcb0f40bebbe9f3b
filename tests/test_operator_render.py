"""The operator's pure parts: what each resource renders and how status is derived (no cluster)."""

from __future__ import annotations

import json

import pytest

from kvops.operator import autoscaling, kube, llmdeployment, prompts, promptversion
from kvops.operator.api import LLMDeploymentSpec, PromptVersionSpec


def owner(kind: str, spec: dict, name: str = "chat") -> dict:
    return {
        "apiVersion": "kvops.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "team", "uid": "uid-1", "generation": 3},
        "spec": spec,
    }


LLMD = {
    "model": {"source": "hf://meta-llama/Llama-3.1-8B-Instruct@main", "dtype": "bfloat16"},
    "engine": {"blockSize": 32, "maxNumSeqs": 8, "maxModelLen": 8192, "prefixCaching": False},
    "replicas": 2,
    "gpus": 2,
    "gpuProduct": "NVIDIA-H100-80GB-HBM3",
    "env": [
        {"name": "HF_TOKEN", "secretKeyRef": {"name": "hf", "key": "token"}},
        {"name": "LOG_LEVEL", "value": "debug"},
    ],
    "prompts": [{"name": "support", "label": "production"}],
    "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "metric": "kvCacheUsage", "target": "80%"},
}


def rendered(spec: dict = LLMD, versions: list | None = None):
    body = owner("LLMDeployment", spec)
    children, stale = llmdeployment.render(
        body, LLMDeploymentSpec.model_validate(spec), versions or []
    )
    return {c["kind"]: c for c in children}, stale


def test_deployment_requests_gpus_and_runs_the_engine_with_the_spec():
    deployment = rendered()[0]["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 2}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    args = container["args"]
    assert args[0] == "serve"

    def flag(name: str) -> str:
        return args[args.index(name) + 1]

    # The pulled source comes from the `chat-model` ConfigMap (pinned once resolved).
    assert flag("--model") == "$(KVOPS_MODEL_SOURCE)"
    assert flag("--model-cache") == "/model-cache"
    assert (flag("--http-port"), flag("--grpc-port")) == ("8000", "50051")
    assert (flag("--block-size"), flag("--max-num-seqs"), flag("--max-model-len")) == (
        "32",
        "8",
        "8192",
    )
    assert flag("--max-num-batched-tokens") == "2048"
    assert flag("--kv-cache-memory-fraction") == "0.9"
    assert flag("--device") == "cuda"
    assert "--no-prefix-caching" in args
    assert deployment["spec"]["replicas"] == 2
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"


def test_pods_run_non_root_with_a_read_only_root_and_no_capabilities():
    pod = rendered()[0]["Deployment"]["spec"]["template"]["spec"]
    security = pod["containers"][0]["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False


def test_secrets_are_only_referenced():
    env = rendered()[0]["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]
    token = next(e for e in env if e["name"] == "HF_TOKEN")
    assert token == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}},
    }
    assert "token" not in json.dumps([e for e in env if e["name"] != "HF_TOKEN"])


def test_children_are_owned_by_the_resource():
    children, _ = rendered()
    assert set(children) == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ConfigMap",
        "PersistentVolumeClaim",
        "HorizontalPodAutoscaler",
    }
    for child in children.values():
        [ref] = child["metadata"]["ownerReferences"]
        assert ref["uid"] == "uid-1" and ref["controller"] is True
        assert child["metadata"]["namespace"] == "team"


def test_service_exposes_http_and_grpc():
    service = rendered()[0]["Service"]
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"http": 8000, "grpc": 50051}
    deployment = rendered()[0]["Deployment"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_the_pod_template_hash_follows_the_spec_but_not_the_replicas():
    def template_hash(spec):
        metadata = rendered(spec)[0]["Deployment"]["spec"]["template"]["metadata"]
        return metadata["annotations"]["kvops.io/spec-hash"]

    base = template_hash(LLMD)
    assert template_hash({**LLMD, "replicas": 5}) == base
    assert template_hash({**LLMD, "engine": {**LLMD["engine"], "maxNumSeqs": 16}}) != base
    assert template_hash({**LLMD, "model": {"source": "builtin://smollm2"}}) != base


def test_autoscaler_scales_the_resource_itself():
    hpa = rendered()[0]["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "LLMDeployment"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    target = hpa["spec"]["metrics"][0]["pods"]
    assert target["metric"]["name"] == "kvops_kv_cache_usage_ratio"
    assert target["target"]["averageValue"] == "800m"


def test_autoscaling_metrics_are_what_the_worker_exports():
    from kvops.worker.serve.telemetry import METRIC_NAMES

    assert set(autoscaling.AUTOSCALING_METRICS.values()) <= set(METRIC_NAMES)


def test_optional_children_are_deleted_when_no_longer_wanted():
    spec = {"model": {"source": "builtin://smollm2"}}
    children, stale = rendered(spec)
    assert "HorizontalPodAutoscaler" not in children and "ConfigMap" not in children
    assert ("autoscaling/v2", "HorizontalPodAutoscaler", "chat") in stale
    assert ("v1", "ConfigMap", "chat-prompts") in stale
    args = children["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "default"


def test_pvc_models_are_mounted_read_only():
    spec = {"model": {"source": "pvc://models/llama/8b"}, "gpus": 0}
    pod = rendered(spec)[0]["Deployment"]["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "/models/models/llama/8b"
    assert args[args.index("--device") + 1] == "cpu"
    # No GPU: requests for host memory and CPU only, sized for a model that is not built in.
    assert pod["containers"][0]["resources"] == {"requests": {"cpu": "2", "memory": "16Gi"}}
    volume = next(v for v in pod["volumes"] if v["name"] == "model")
    assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}


def pv_spec(content: str, variables=("question",)) -> PromptVersionSpec:
    return PromptVersionSpec.model_validate(
        {
            "promptName": "support",
            "version": "1",
            "template": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": content},
            ],
            "variables": [{"name": v} for v in variables],
        }
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{{ question }", "template[1].content: line 1: unexpected '}'"),
        ("{{ question }} {{ context }}", "undeclared variables context"),
        ("{{ question.__class__.__mro__ }}", "template[1].content: SecurityError"),
    ],
)
def test_template_errors_name_the_message(content, expected):
    assert expected in prompts.template_error(pv_spec(content))


def test_valid_template_and_content_hash():
    spec = pv_spec("Answer: {{ question | upper }}")
    assert prompts.template_error(spec) is None
    assert prompts.content_hash(spec).startswith("sha256:")
    assert prompts.content_hash(spec) == prompts.content_hash(
        pv_spec("Answer: {{ question | upper }}")
    )
    assert prompts.content_hash(spec) != prompts.content_hash(pv_spec("{{ question }}"))
    status = promptversion.render_status(owner("PromptVersion", {}), spec, [])
    assert status["valid"] is True and status["conditions"][0]["status"] == "True"


def deployment_with(ready: int, replicas: int, updated: int, generation=1, observed=1, **extra):
    return {
        "metadata": {"generation": generation},
        "status": {
            "observedGeneration": observed,
            "readyReplicas": ready,
            "replicas": replicas,
            "updatedReplicas": updated,
            **extra,
        },
    }


def llmd_status(deployment, spec=LLMD, previous=None):
    body = owner("LLMDeployment", spec)
    if previous:
        body["status"] = {"conditions": previous}
    return llmdeployment.render_status(body, LLMDeploymentSpec.model_validate(spec), deployment)


def conditions_of(status):
    return {c["type"]: c["status"] for c in status["conditions"]}


def test_status_available_when_every_replica_is_ready():
    status = llmd_status(deployment_with(2, 2, 2))
    assert status["phase"] == "Available" and status["ready"] == "2/2"
    assert conditions_of(status) == {
        "Available": "True",
        "Progressing": "False",
        "Degraded": "False",
        "Ready": "True",
    }
    assert status["observedGeneration"] == 3
    assert status["endpoint"] == "chat.team.svc:8000"
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])


def test_status_while_rolling_out_and_when_stalled():
    rolling = llmd_status(deployment_with(2, 3, 1))
    assert rolling["phase"] == "Progressing"
    assert conditions_of(rolling)["Progressing"] == "True"
    assert conditions_of(rolling)["Ready"] == "False"
    stalled = llmd_status(
        deployment_with(
            0,
            2,
            2,
            conditions=[
                {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
            ],
        )
    )
    assert stalled["phase"] == "Degraded"
    assert conditions_of(stalled)["Degraded"] == "True"
    assert llmd_status(None)["phase"] == "Pending"


def test_transition_time_only_moves_when_the_status_changes():
    previous = [
        {"type": "Available", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z"},
        {"type": "Ready", "status": "False", "lastTransitionTime": "2020-01-01T00:00:00Z"},
    ]
    status = llmd_status(deployment_with(2, 2, 2), previous=previous)
    times = {c["type"]: c["lastTransitionTime"] for c in status["conditions"]}
    assert times["Available"] == "2020-01-01T00:00:00Z"
    assert times["Ready"] != "2020-01-01T00:00:00Z"


def test_owner_reference_blocks_owner_deletion():
    ref = kube.owner_reference(owner("LLMDeployment", {}))
    assert ref == {
        "apiVersion": "kvops.io/v1alpha1",
        "kind": "LLMDeployment",
        "name": "chat",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def evaluated_spec(**parameters) -> PromptVersionSpec:
    return PromptVersionSpec.model_validate(
        {
            "promptName": "support",
            "version": "1",
            "template": [
                {"role": "system", "content": "You answer about {{ product }}."},
                {"role": "user", "content": "{{ question }}"},
            ],
            "variables": [
                {"name": "product", "required": False, "default": "kvops"},
                {"name": "question"},
            ],
            "modelParameters": parameters,
            "evaluation": {
                "llmDeployment": "chat",
                "dataset": [{"inputs": {"question": "Hi?"}, "expect": [{"contains": "Hello"}]}],
            },
        }
    )


def test_evaluation_requests_render_the_template_with_defaults_and_parameters():
    from kvops.operator import evaluation

    body = evaluation.chat_request(
        evaluated_spec(temperature=0.0, maxTokens=8, stop=["\n"]), "chat", {"question": "Hi?"}
    )
    assert body == {
        "model": "chat",
        "messages": [
            {"role": "system", "content": "You answer about kvops."},
            {"role": "user", "content": "Hi?"},
        ],
        "temperature": 0.0,
        "max_tokens": 8,
        "stop": ["\n"],
    }
    with pytest.raises(ValueError, match="missing required variables: question"):
        prompts.render_messages(evaluated_spec(), {})


def test_kvops_serve_accepts_the_rendered_arguments(monkeypatch):
    """The contract with the worker: its own parser takes exactly what the operator renders."""
    from kvops.worker.serve import cli

    parsed = []
    monkeypatch.setattr(cli, "serve_command", lambda args: parsed.append(args) or 0)
    container = rendered()[0]["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["kvops"]
    assert cli.main(container["args"]) == 0
    [args] = parsed
    assert (args.host, args.http_port, args.grpc_port) == ("0.0.0.0", 8000, 50051)
    assert (args.model, args.dtype, args.device) == ("$(KVOPS_MODEL_SOURCE)", "bfloat16", "cuda")
    assert (args.block_size, args.max_num_seqs, args.max_model_len) == (32, 8, 8192)
    assert args.no_prefix_caching is True
    assert args.kv_cache_memory_fraction == 0.9
    assert args.served_model_name == "chat"
