"""Install one extra's dependencies from pyproject.toml alone, before the code is copied in.

The images install dependencies in a layer keyed on pyproject.toml only, so a code change does
not reinstall torch. `--torch-variant cpu` leaves out triton (about 1 GB installed), which only
CUDA kernels use. torch's nvidia-* wheels cannot be left out, not even on a CPU: the PyPI build
of libtorch links libcudart, libcublas, libcudnn, libnccl and more at load time, and
`import torch` fails without them (e2e/images/README.md).

Usage (with the target environment's python): install_deps.py PYPROJECT EXTRA [--torch-variant]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import tomllib

SKIPPED_ON_CPU = {"triton"}


def name_of(requirement: str) -> str:
    """The normalised project name a PEP 508 requirement starts with."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(project: dict, extras: list[str]) -> list[str]:
    """The base dependencies and those of `extras`, following the project's references to its
    own extras (`kvops[worker,operator]`) and leaving the project itself out."""
    own = name_of(project["name"])
    optional = project.get("optional-dependencies", {})
    found = list(project.get("dependencies", []))
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in optional[extra]:
            if name_of(requirement) == own:
                pending += re.findall(r"[\w-]+", requirement.partition("[")[2].partition("]")[0])
            else:
                found.append(requirement)
    return list(dict.fromkeys(found))


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument("extra", nargs="+")
    parser.add_argument("--torch-variant", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    with open(args.pyproject, "rb") as file:
        wanted = requirements(tomllib.load(file)["project"], args.extra)
    torch = [r for r in wanted if name_of(r) == "torch"]
    if args.torch_variant == "cuda" or not torch:
        pip(*wanted)
        return
    # pip would install the dependencies of an installed torch again on any later install that
    # names torch, so: everything else first, then torch alone, then its own dependencies.
    pip(*[r for r in wanted if name_of(r) != "torch"])
    pip("--no-deps", *torch)
    torch_deps = [
        r
        for r in importlib.metadata.requires("torch") or []
        if name_of(r) not in SKIPPED_ON_CPU and "extra ==" not in r
    ]
    # pip evaluates their environment markers; it would report the missing triton as an error.
    pip("--no-warn-conflicts", *torch_deps)


if __name__ == "__main__":
    main()
