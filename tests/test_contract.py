"""The operator–worker contract: every container the operator renders runs a command line that
the installed `kvops` accepts. Each rendered command runs here against the real CLI (`kvops serve
--check` validates options and the model source without loading weights), so the operator and
the CLI cannot drift apart unnoticed. What this cannot see (the image, the kubelet, the mounts)
is covered by e2e/test_real_pods.py on a real node."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvops.operator import contract, llmdeployment, rbac, vectorindex
from kvops.operator.api import LLMDeploymentSpec, VectorIndexSpec

SPECS = {
    "builtin-cpu": {"model": {"source": "builtin://smollm2", "dtype": "float32"}, "gpus": 0},
    "builtin-gpu-everything": {
        "model": {"source": "builtin://smollm2", "servedName": "chat"},
        "engine": {"blockSize": 32, "maxNumSeqs": 8, "maxModelLen": 2048, "prefixCaching": False},
        "gpus": 2,
        "env": [
            {"name": "HF_TOKEN", "secretKeyRef": {"name": "hf", "key": "token", "optional": True}},
            {"name": "HOME", "value": "/cache/elsewhere"},
        ],
        "prompts": [{"name": "support"}],
        "retrieval": {"vectorIndex": "docs", "topK": 3},
        "observability": {"otlpEndpoint": "http://collector:4317", "samplingRatio": 1.0},
        "resources": {"requests": {"cpu": "4", "memory": "24Gi"}, "limits": {"memory": "32Gi"}},
        "imagePullSecrets": [{"name": "registry"}],
        "serviceAccountName": "worker",
        "priorityClassName": "inference",
        "runtimeClassName": "nvidia",
        "startupTimeoutSeconds": 1200,
    },
    "pvc": {"model": {"source": "pvc://models/llama/8b"}, "gpus": 1},
}


def owner(kind: str, spec: dict, name: str = "chat") -> dict:
    metadata = {"name": name, "namespace": "team", "uid": "uid-1", "generation": 1}
    return {"apiVersion": "kvops.io/v1alpha1", "kind": kind, "metadata": metadata, "spec": spec}


def worker_container(spec: dict) -> dict:
    children, _ = llmdeployment.render(
        owner("LLMDeployment", spec), LLMDeploymentSpec.model_validate(spec), {}
    )
    [container] = contract.containers(children)
    return container


def run_container(container: dict, *extra: str) -> subprocess.CompletedProcess:
    """The container's exact command line with its plain environment, on this machine."""
    env = dict(os.environ)
    env.update({var["name"]: var["value"] for var in container.get("env", []) if "value" in var})
    command = [*container["command"], *container["args"], *extra]
    assert command[0] == "kvops"
    return subprocess.run(
        [sys.executable, "-m", "kvops.worker.serve.cli", *command[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("case", SPECS)
def test_the_worker_cli_parses_every_rendered_worker_command(case):
    assert contract.command_problem(worker_container(SPECS[case])) is None


@pytest.mark.slow
@pytest.mark.parametrize("case", SPECS)
def test_the_worker_cli_accepts_every_rendered_worker_command(case):
    container = worker_container(SPECS[case])
    result = run_container(container, "--check")
    if case == "pvc":
        # Everything checks out but the model, which lives on the claim mounted in the pod.
        assert result.returncode == 2
        assert "'/models/models/llama/8b': no such file or folder" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert "configuration OK" in result.stdout


def test_a_flag_the_cli_lacks_is_caught_before_any_pod_runs_it():
    container = worker_container(SPECS["builtin-cpu"])
    container["args"] = [*container["args"], "--speculative-model", "tiny"]
    problem = contract.command_problem(container)
    assert problem is not None and "unrecognized arguments: --speculative-model tiny" in problem
    assert run_container(container).returncode == 2


def test_the_operator_deployment_runs_a_command_the_cli_has():
    [deployment] = [
        doc for doc in rbac.install_documents("kvops-system", False) if doc["kind"] == "Deployment"
    ]
    assert contract.children_problem([deployment]) is None
    result = run_container(deployment["spec"]["template"]["spec"]["containers"][0], "--help")
    assert result.returncode == 0 and "--liveness" in result.stdout


def test_vector_index_containers_are_refused_until_the_cli_has_kvops_index():
    """The index data plane (`kvops index build|serve`) is not in this release: the operator
    must refuse a VectorIndex with a condition rather than run Jobs that crash."""
    spec = {"source": {"documents": [{"id": "a", "text": "alpha"}]}}
    children = vectorindex.render(owner("VectorIndex", spec), VectorIndexSpec.model_validate(spec))
    rendered = contract.containers(children)
    assert {c["name"] for c in rendered} == {"build", "search"}
    for container in rendered:
        problem = contract.command_problem(container)
        assert problem is not None and "invalid choice: 'index'" in problem
        result = run_container(container)
        assert result.returncode == 2 and "invalid choice: 'index'" in result.stderr
