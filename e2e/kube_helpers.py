"""kubectl in one namespace and bounded waits, shared by the cluster tests and e2e/."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

CRDS = Path(__file__).resolve().parent.parent / "crds"


def install_crds(cluster) -> None:
    """Every CRD of crds/ (ours and kopf's peering), established."""
    cluster.kubectl("apply", "--server-side", "-f", str(CRDS))
    names = [
        f"crd/{path.stem.split('_', 1)[1]}.{path.stem.split('_', 1)[0]}"
        for path in sorted(CRDS.glob("*_*.yaml"))
    ]
    cluster.kubectl("wait", "--for", "condition=Established", "--timeout=60s", *names)


def kvops_output(*args: str) -> str:
    """What the installed `kvops` prints (manifests for kubectl)."""
    command = [sys.executable, "-m", "kvops.worker.serve.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout


def wait_for(
    what: str,
    check: Callable[[], Any],
    timeout: float = 60,
    interval: float = 0.5,
    diagnostics: Callable[[], str] = lambda: "",
) -> Any:
    """`check()`'s first truthy result; fails the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(
        f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}\n{diagnostics()}"
    )


class Namespace:
    """kubectl (the cluster's pinned one) in one namespace."""

    def __init__(self, cluster, namespace: str):
        self.cluster = cluster
        self.namespace = namespace

    def __call__(self, *args: str, input: str | None = None, timeout: float = 60) -> str:
        return self.cluster.kubectl("-n", self.namespace, *args, input=input, timeout=timeout)

    def diagnostics(self) -> str:
        """What a failed wait prints besides its own message."""
        return ""

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
        return wait_for(what, check, timeout, diagnostics=self.diagnostics)

    def apply(self, obj: dict[str, Any]) -> str:
        return self("apply", "-f", "-", input=yaml.safe_dump(obj))

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self("get", kind, name, "-o", "json"))
        except Exception as error:
            if "NotFound" in str(error):
                return None
            raise

    def items(self, kind: str, selector: str) -> list[dict[str, Any]]:
        return json.loads(self("get", kind, "-l", selector, "-o", "json"))["items"]

    def status(self, kind: str, name: str) -> dict[str, Any]:
        return (self.get(kind, name) or {}).get("status") or {}

    def condition(self, kind: str, name: str, type_: str) -> dict[str, Any] | None:
        for condition in self.status(kind, name).get("conditions", []):
            if condition["type"] == type_:
                return condition
        return None

    def refused(self, obj: dict[str, Any]) -> str:
        """The API server's message when it rejects `obj` (fails the test if it is accepted)."""
        try:
            self.apply(obj)
        except Exception as error:
            return str(error)
        pytest.fail(f"the API server accepted {obj['metadata']['name']}")


def kube_time() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def terminate_pod(
    kubectl: Callable[..., Any], pod: dict[str, Any], exit_code: int, message: str
) -> None:
    """Finish a pod on a kwok node (where no container ever runs) the way a kubelet would when
    its container exits: a terminal phase, the container's terminated state carrying `message` as
    its termination message, pod conditions no longer ready. The Job controller takes it from
    there. `kubectl` runs kubectl with its arguments (e2e tests' Kube)."""
    now = kube_time()
    container = pod["spec"]["containers"][0]
    conditions = [
        {"type": type_, "status": status, "lastTransitionTime": now}
        for type_, status in [
            ("PodScheduled", "True"),
            ("Initialized", "True"),
            ("ContainersReady", "False"),
            ("Ready", "False"),
        ]
    ]
    terminated = {
        "exitCode": exit_code,
        "reason": "Completed" if exit_code == 0 else "Error",
        "message": message,
        "startedAt": pod["status"].get("startTime", now),
        "finishedAt": now,
    }
    status = {
        "phase": "Succeeded" if exit_code == 0 else "Failed",
        "conditions": conditions,
        "containerStatuses": [
            {
                "name": container["name"],
                "image": container["image"],
                "imageID": "",
                "ready": False,
                "started": False,
                "restartCount": 0,
                "state": {"terminated": terminated},
            }
        ],
    }
    kubectl(
        "patch",
        "pod",
        pod["metadata"]["name"],
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )
