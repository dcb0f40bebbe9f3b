"""The pure parts of the image build (e2e/images): the extras each image installs and the
content hash its archive is cached under. Building the images is `make images`."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "e2e" / "images"))

import build_images  # noqa: E402
import install_deps  # noqa: E402


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def names(extras: list[str]) -> set[str]:
    return {install_deps.name_of(r) for r in install_deps.requirements(project(), extras)}


def third_party_imports(folder: str) -> set[str]:
    """Top-level modules the folder's Python files import that are neither stdlib nor kvops."""
    found = set()
    for module in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.partition(".")[0])
    return found - set(sys.stdlib_module_names) - {"kvops", "__future__"}


def test_the_operator_extra_covers_its_imports_and_carries_no_torch():
    wanted = names(["operator"])
    distributions = importlib.metadata.packages_distributions()
    for module in third_party_imports("operator"):
        provided_by = {install_deps.name_of(d) for d in distributions[module]}
        assert provided_by & wanted, f"operator/ imports {module}; add it to kvops[operator]"
    assert not wanted & {"torch", "numpy", "grpcio", "triton"}


def test_the_worker_extra_leaves_out_the_operator():
    wanted = names(["worker"])
    assert {"torch", "gguf", "grpcio", "starlette"} <= wanted
    assert not wanted & {"kopf", "kubernetes"}


def test_dev_follows_the_references_to_the_other_extras():
    assert names(["worker"]) | names(["operator"]) <= names(["dev"])
    assert "kvops" not in names(["dev"])


def test_the_worker_cli_does_not_import_kopf():
    code = (
        "import sys\nfrom kvops.worker.serve import cli\n"
        "try:\n    cli.main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'kopf' not in sys.modules and 'kubernetes' not in sys.modules, 'kopf imported'\n"
        "assert 'torch' not in sys.modules, 'torch imported for --help'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_the_content_hash_follows_every_source_file(tmp_path, monkeypatch):
    monkeypatch.setattr(build_images, "ROOT", tmp_path)
    (tmp_path / "worker" / "ops").mkdir(parents=True)
    source = tmp_path / "worker" / "ops" / "a.py"
    source.write_text("x = 1\n")
    first = build_images.tree_digest(["worker"])
    (tmp_path / "worker" / "ops" / "__pycache__").mkdir()
    (tmp_path / "worker" / "ops" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    assert build_images.tree_digest(["worker"]) == first  # caches do not count
    source.write_text("x = 2\n")
    assert build_images.tree_digest(["worker"]) != first
    source.write_text("x = 1\n")
    source.rename(tmp_path / "worker" / "b.py")  # a move counts
    assert build_images.tree_digest(["worker"]) != first


def test_each_image_and_build_argument_has_its_own_key(monkeypatch):
    keys = {build_images.image_key(name, "sources") for name in build_images.IMAGES}
    assert len(keys) == len(build_images.IMAGES)
    worker = build_images.image_key("kvops-worker", "sources")
    assert worker == build_images.image_key("kvops-worker", "sources")
    assert worker != build_images.image_key("kvops-worker", "other sources")
    args = {**build_images.IMAGES["kvops-worker"]["args"], "KVOPS_KERNEL_MARCH": "x86-64-v4"}
    monkeypatch.setitem(build_images.IMAGES["kvops-worker"], "args", args)
    assert build_images.image_key("kvops-worker", "sources") != worker


@pytest.mark.parametrize("field", ["include", "mirror"])
def test_the_base_is_named_by_its_recipe(monkeypatch, field):
    tag = build_images.base_tag()
    assert tag.startswith("localhost/kvops-base:bookworm-")
    monkeypatch.setitem(build_images.BASE_RECIPE, field, ["changed"])
    assert build_images.base_tag() != tag
