"""The allowed import edges between kvops' modules, read from the source (no import runs):
no cycles; the model runner does not know the scheduler; the servers see the engine only through
AsyncLLMEngine; the operator never reaches the engine or torch. A reintroduced reach-through or
cycle fails here, naming the edge."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Imports inside functions are allowed only where they keep start-up cheap, never to dodge a
# cycle: the CLI entry points load the component a subcommand needs, not both, and the attention
# backends load only the kernel module they run (Triton is not in the CPU image).
LAZY_ALLOWED = {
    "kvops.worker.serve.cli",
    "kvops.operator.cli",
    "kvops.worker.ops.attention",
    "kvops.worker.rag.cli",
    # A model pull loads only its source's client (huggingface_hub, boto3; torch for builtin://).
    "kvops.worker.models.cli",
    "kvops.worker.models.pull",
    # Quantized layers load Triton only on CUDA, the C++ extension only on the CPU.
    "kvops.worker.ops.quant_linear",
}
# What the servers (worker/serve/, but the CLI) may import from the rest of the worker.
# RAG adds the retrieval library's client (search a VectorIndex), embedder (groundedness,
# /v1/embeddings) and groundedness scorer: the servers use it, never the index itself.
SERVER_DOORS = {
    "kvops.worker.async_engine",
    "kvops.worker.request",
    "kvops.worker.rag.client",
    "kvops.worker.rag.embedding",
    "kvops.worker.rag.grounding",
}
# What the worker (but the CLI, which also carries the operator's commands) may import from the
# operator: the pure prompt logic and the models it reads (pydantic and jinja2 only), so that a
# managed prompt renders by one implementation in an evaluation and in serving.
OPERATOR_DOORS = {"kvops.operator.prompts", "kvops.operator.api"}


def modules() -> dict[str, Path]:
    """Every module of the distribution: dotted name -> file (pyproject's package-dir map)."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    found = {}
    for package, folder in package_dir.items():
        for path in (ROOT / folder).rglob("*.py"):
            relative = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


MODULES = modules()


def imports(name: str) -> tuple[set[str], set[str]]:
    """(module-level, function-level) imports of kvops modules (and torch) by module `name`."""
    tree = ast.parse(MODULES[name].read_text())
    top: set[str] = set()
    lazy: set[str] = set()

    def targets(node: ast.Import | ast.ImportFrom) -> set[str]:
        if isinstance(node, ast.Import):
            names = {alias.name for alias in node.names}
        else:
            base = node.module or ""
            # `from kvops.operator import kube` imports the module kvops.operator.kube
            names = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
            names = names or {base}
        return {n for n in names if n.startswith("kvops.") or n.split(".")[0] == "torch"}

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                (lazy if in_function else top).update(targets(child))
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            visit(child, nested)

    visit(tree, False)
    return {m if m in MODULES else m.split(".")[0] for m in top}, {
        m if m in MODULES else m.split(".")[0] for m in lazy
    }


EDGES = {name: imports(name) for name in MODULES}


def all_imports(name: str) -> set[str]:
    top, lazy = EDGES[name]
    return top | lazy


def test_no_cycles_among_module_level_imports():
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(EDGES[name][0] & MODULES.keys()):
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [name])


def test_imports_inside_functions_only_where_start_up_cost_asks_for_them():
    offenders = {
        name: sorted(lazy & MODULES.keys())
        for name, (_, lazy) in EDGES.items()
        if lazy & MODULES.keys() and name not in LAZY_ALLOWED
    }
    assert offenders == {}


def test_the_model_runner_does_not_know_the_scheduler():
    assert "kvops.worker.scheduler" not in all_imports("kvops.worker.model_runner")


def test_the_servers_see_the_engine_only_through_the_async_engine():
    servers = [
        n for n in MODULES if n.startswith("kvops.worker.serve.") and n != "kvops.worker.serve.cli"
    ]
    reach = {
        name: sorted(
            t
            for t in all_imports(name)
            if t.startswith("kvops.worker.")
            and not t.startswith("kvops.worker.serve.")
            and t not in SERVER_DOORS
        )
        for name in servers
    }
    assert {name: targets for name, targets in reach.items() if targets} == {}


def test_the_worker_imports_of_the_operator_only_its_pure_prompt_logic():
    reach = {
        name: sorted(
            t
            for t in all_imports(name)
            if t.startswith("kvops.operator.") and t not in OPERATOR_DOORS
        )
        for name in MODULES
        if name.startswith("kvops.worker.") and name != "kvops.worker.serve.cli"
    }
    assert {name: targets for name, targets in reach.items() if targets} == {}
    # The doors stay pure: they reach no other kvops module (the operator runtime, kube, kopf).
    for door in OPERATOR_DOORS:
        assert not {t for t in all_imports(door) if t.startswith("kvops.")} - OPERATOR_DOORS


def test_the_operator_never_imports_the_engine_or_torch():
    reach = {
        name: sorted(
            t
            for t in all_imports(name)
            if t == "torch" or (t.startswith("kvops.worker.") and t != "kvops.worker.serve.cli")
        )
        for name in MODULES
        if name.startswith("kvops.operator.")
    }
    assert {name: targets for name, targets in reach.items() if targets} == {}
