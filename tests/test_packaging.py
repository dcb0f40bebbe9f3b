"""The package list in pyproject.toml matches the source folders (strict editable installs and
wheels only contain what is listed)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def source_packages(folder: str, package: str) -> set[str]:
    """Every folder under `folder` that holds Python modules, as a dotted package name."""
    found = set()
    for module in (ROOT / folder).rglob("*.py"):
        relative = module.parent.relative_to(ROOT / folder)
        found.add(".".join([package, *relative.parts]))
    return found


def test_every_source_folder_is_a_listed_package():
    setuptools = pyproject()["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    for package, folder in setuptools["package-dir"].items():
        assert source_packages(folder, package) <= listed
    assert all(any(p.startswith(k) for k in setuptools["package-dir"]) for p in listed)


def test_component_roots_have_no_init_module():
    # A regular package named `operator` at the repository root would shadow the standard library.
    for folder in pyproject()["tool"]["setuptools"]["package-dir"].values():
        assert not (ROOT / folder / "__init__.py").exists(), folder


def test_the_console_script_resolves():
    from importlib.metadata import entry_points

    [script] = [e for e in entry_points(group="console_scripts") if e.name == "kvops"]
    assert callable(script.load())
