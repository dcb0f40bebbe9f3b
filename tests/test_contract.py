"""The operator–worker contract: every container the operator renders runs a command line that
the installed `kvops` accepts. Each rendered command runs here against the real CLI (`kvops serve
--check` validates options and the model source without loading weights), so the operator and
the CLI cannot drift apart unnoticed. What this cannot see (the image, the kubelet, the mounts)
is covered by e2e/test_real_pods.py on a real node."""

from __future__ import annotations

import json
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
        owner("LLMDeployment", spec), LLMDeploymentSpec.model_validate(spec), []
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


VECTOR_INDEX_SPECS = {
    "documents": {"source": {"documents": [{"id": "a", "text": "alpha"}]}},
    "config-map-ivf-dot": {
        "source": {"configMap": {"name": "docs"}},
        "chunking": {"size": 64, "overlap": 8},
        "indexType": "ivf",
        "metric": "dot",
    },
    "pvc-l2-llmd": {
        "source": {"pvc": {"claimName": "corpus", "path": "/handbook"}},
        "embedding": {"model": "llmd://chat"},
        "metric": "l2",
    },
}


def vector_index_containers(spec: dict) -> dict[str, dict]:
    """The build Job's container (nothing served yet) and the search Deployment's once that
    build is served."""
    parsed = VectorIndexSpec.model_validate(spec)
    build = vectorindex.build_hash(parsed)
    served = vectorindex.Build(build, parsed.image, parsed.image_pull_policy, "ReadOnlyMany")
    building = vectorindex.render(owner("VectorIndex", spec), parsed, build, None)
    serving = vectorindex.render(owner("VectorIndex", spec), parsed, build, served)
    [build_container] = contract.containers(building)
    [search_container] = contract.containers(serving)
    return {"build": build_container, "search": search_container}


@pytest.mark.parametrize("case", VECTOR_INDEX_SPECS)
def test_the_cli_parses_every_rendered_vector_index_command(case):
    containers = vector_index_containers(VECTOR_INDEX_SPECS[case])
    assert set(containers) == {"build", "search"}
    for container in containers.values():
        assert contract.command_problem(container) is None


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.slow
def test_the_rendered_build_command_builds_an_index_that_the_search_command_serves(tmp_path):
    """The build Job's exact arguments, with only its paths moved from the pod's mounts into a
    temporary folder: the real build runs, writes the folder the search container's --index
    names, and reports in the termination log."""
    containers = vector_index_containers(VECTOR_INDEX_SPECS["documents"])
    build_args = containers["build"]["args"]
    assert flag(build_args, "--source").endswith("/documents.json")
    documents = tmp_path / "documents.json"
    documents.write_text('[{"id": "faq", "text": "Refunds are paid within 14 days."}]')
    log = tmp_path / "termination-log"
    log.write_text("")
    moved = {
        flag(build_args, "--source"): str(documents),
        flag(build_args, "--termination-log"): str(log),
    }
    index_dir = flag(build_args, "--output")
    assert index_dir == flag(containers["search"]["args"], "--index")
    moved[index_dir] = str(tmp_path / index_dir.lstrip("/"))
    container = {**containers["build"], "args": [moved.get(a, a) for a in build_args]}
    result = run_container(container)
    assert result.returncode == 0, result.stderr
    report = json.loads(log.read_text())
    assert (report["documents"], report["chunks"], report["dimension"]) == (1, 1, 384)
    assert (tmp_path / index_dir.lstrip("/") / "manifest.json").is_file()
    search = {**containers["search"], "args": [*containers["search"]["args"], "--help"]}
    assert run_container(search).returncode == 0
