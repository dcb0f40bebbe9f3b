"""How the operator copes with many resources at once.

Starts the local control plane (e2e/controlplane.py, binaries from `make tools`) with enough fake
nodes, runs `kvops operator` as a subprocess, creates N LLMDeployments in one `kubectl apply`, and
measures the time until every one reports Available plus the operator's CPU time and memory.

    .venv/bin/python bench/operator_scale.py --count 200 --record bench/results/operator_scale.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "e2e"))

from controlplane import LocalControlPlane  # noqa: E402

NAMESPACE = "scale"
PODS_PER_NODE = 110


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Tiny requests: the fake nodes must hold every pod (the default for the built-in model, 500m
# CPU and 4Gi, would leave most of them Pending), and the operator's work is what is measured.
SMALL = {"requests": {"cpu": "10m", "memory": "64Mi"}}


def manifest(count: int) -> str:
    items = [
        {
            "apiVersion": "kvops.io/v1alpha1",
            "kind": "LLMDeployment",
            "metadata": {"name": f"scale-{index:04d}", "namespace": NAMESPACE},
            "spec": {
                "model": {"source": "builtin://smollm2"},
                "replicas": 1,
                "gpus": 0,
                "resources": SMALL,
            },
        }
        for index in range(count)
    ]
    return yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items})


def count_available(plane: LocalControlPlane) -> int:
    listed = json.loads(plane.kubectl("get", "llmd", "-n", NAMESPACE, "-o", "json", timeout=120))
    return sum(1 for o in listed["items"] if (o.get("status") or {}).get("phase") == "Available")


def run(count: int, timeout: float) -> dict:
    nodes = max(2, -(-count // (PODS_PER_NODE - 10)))
    with LocalControlPlane(gpu_nodes=nodes) as plane:
        plane.kubectl("create", "namespace", NAMESPACE)
        plane.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        plane.kubectl("wait", "--for", "condition=Established", "--timeout=60s", "crd", "--all")
        log = Path(tempfile.mkdtemp(prefix="kvops-operator-")) / "operator.log"
        env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig)}
        command = [sys.executable, "-m", "kvops.worker.serve.cli", "operator"]
        command += ["--namespace", NAMESPACE, "--metrics-port", str(free_port())]
        with log.open("w") as out:
            operator = subprocess.Popen(command, env=env, stdout=out, stderr=out)
        process = psutil.Process(operator.pid)
        try:
            time.sleep(3)  # the operator's watches are up before the burst
            cpu_before = process.cpu_times()
            start = time.monotonic()
            plane.kubectl("apply", "-f", "-", input=manifest(count), timeout=300)
            created_s = time.monotonic() - start
            peak_rss = 0
            available = 0
            deadline = start + timeout
            while time.monotonic() < deadline:
                peak_rss = max(peak_rss, process.memory_info().rss)
                available = count_available(plane)
                if available == count:
                    break
                time.sleep(2)
            elapsed = time.monotonic() - start
            cpu_after = process.cpu_times()
        finally:
            operator.terminate()
            operator.wait(timeout=30)
    cpu = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    return {
        "count": count,
        "fake_nodes": nodes,
        "available": available,
        "apply_seconds": round(created_s, 1),
        "all_available_seconds": round(elapsed, 1) if available == count else None,
        "operator_cpu_seconds": round(cpu, 1),
        "operator_peak_rss_mib": round(peak_rss / 2**20, 1),
    }


def record(path: Path, result: dict, argv: list[str]) -> None:
    memory_gib = psutil.virtual_memory().total / 2**30
    lines = [
        f"## {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, {memory_gib:.0f} GiB, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        f"- command: `{' '.join(['.venv/bin/python', *argv])}`",
        "- control plane: local etcd + kube-apiserver + controller manager + scheduler + kwok "
        "(e2e/controlplane.py); the operator, control plane and kubectl share the machine",
        "",
        "| " + " | ".join(result) + " |",
        "|" + "---|" * len(result),
        "| " + " | ".join(str(v) for v in result.values()) + " |",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "" if path.exists() else "# Operator scale: N LLMDeployments created at once\n\n"
    with path.open("a") as out:
        out.write(header + "\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for all")
    parser.add_argument("--record", type=Path, default=None, help="append the result here")
    args = parser.parse_args()
    result = run(args.count, args.timeout)
    print(json.dumps(result, indent=2))
    if args.record:
        record(args.record, result, sys.argv)
    return 0 if result["available"] == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
