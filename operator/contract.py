"""The operator–worker contract: every container the operator renders runs `kvops` with arguments
that the worker's own command line accepts.

The operator parses each rendered command line with the CLI's parser before it applies anything,
so a flag or subcommand the worker lacks becomes a condition on the resource instead of a pod
that crash-loops. tests/test_contract.py runs the same command lines against the installed CLI.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

# The worker's parser builds without torch or kopf: the operator image has neither torch nor
# the worker's dependencies.
from kvops.worker.serve.cli import build_parser


class _RefusingParser(argparse.ArgumentParser):
    """argparse that raises instead of printing and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        raise ValueError(message or f"the command line exits with status {status}")


@functools.cache
def _parser() -> argparse.ArgumentParser:
    """Built once (about 7 ms): every reconcile checks its containers, and parsing leaves the
    parser as it was."""
    return build_parser(_RefusingParser)


def containers(children: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every container of the Deployments and Jobs among `children`."""
    found = []
    for child in children:
        if child["kind"] in ("Deployment", "Job"):
            pod = child["spec"]["template"]["spec"]
            found += pod.get("initContainers", []) + pod["containers"]
    return found


def command_problem(container: dict[str, Any]) -> str | None:
    """Why the worker image's `kvops` would refuse this container's command line, if it would."""
    command = [*container.get("command", []), *container.get("args", [])]
    if command[:1] != ["kvops"]:
        return f"container {container['name']} runs {command[:1]}, not kvops"
    try:
        _parser().parse_args(command[1:])
    except ValueError as error:
        return f"container {container['name']}: `{' '.join(command[:3])} ...`: {error}"
    return None


def children_problem(children: list[dict[str, Any]]) -> str | None:
    for container in containers(children):
        problem = command_problem(container)
        if problem is not None:
            return problem
    return None
