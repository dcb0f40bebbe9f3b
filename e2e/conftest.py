"""Tests against real Kubernetes components (e2e/controlplane.py; binaries from `make tools`).

Two clusters per session, each started once: `kube_cluster`, the control plane with kwok's fake
GPU nodes (scheduling and status at scale; no container runs), and `cluster`, the control plane
with one real node (containerd, kubelet, kube-proxy, CNI, local-path storage) into which the
session imports the project's images (e2e/images, cached by content hash). `kube` installs the
CRDs and the operator, as a pod from its image, into a namespace that enforces Pod Security
`restricted`. Everything listens on 127.0.0.1 or on the cluster's own bridge. The fixtures fail,
never skip, when the tools are missing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
# tests/ for serve_process (a kvops serve to evaluate prompts against), e2e/images for the builds.
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "e2e" / "images")]
from kube_helpers import Namespace, install_crds, kvops_output  # noqa: E402

NAMESPACE = "kvops-e2e"


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.cluster)
        item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def kube_cluster():
    """The control plane with kwok's two fake GPU nodes only."""
    from controlplane import LocalControlPlane

    with LocalControlPlane() as plane:
        yield plane


@pytest.fixture(scope="session")
def images() -> dict[str, Path]:
    from build_images import build_images

    return build_images()


@pytest.fixture(scope="session")
def cluster(images):
    from controlplane import LocalControlPlane

    with LocalControlPlane(real_node=True) as plane:
        for archive in images.values():
            plane.import_image(archive)
        yield plane


class Kube(Namespace):
    """kubectl in the e2e namespace; a failed wait shows the operator pod's log."""

    def diagnostics(self) -> str:
        try:
            return "operator log:\n" + self("logs", "deployment/kvops-operator", "--tail=40")
        except Exception as error:  # the log is a diagnostic: never hide the real failure
            return f"(no operator log: {error})"


@pytest.fixture(scope="session")
def kube(cluster) -> Kube:
    """The namespace, enforcing Pod Security `restricted`, with the CRDs and the operator running
    as a pod from its image under its least-privilege Role."""
    labels = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn")}
    namespace = {"apiVersion": "v1", "kind": "Namespace"}
    namespace["metadata"] = {"name": NAMESPACE, "labels": labels}
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(namespace))
    install_crds(cluster)
    cluster.kubectl("apply", "-f", "-", input=kvops_output("manifests", "--namespace", NAMESPACE))
    kube = Kube(cluster, NAMESPACE)
    kube("rollout", "status", "deployment/kvops-operator", "--timeout=180s", timeout=200)
    return kube


class PortForward:
    """`kubectl port-forward` to a Service or pod on a free 127.0.0.1 port."""

    def __init__(self, kube: Kube, target: str, port: int):
        command = [
            str(kube.cluster.bin_dir / "kubectl"),
            "--kubeconfig",
            str(kube.cluster.kubeconfig),
            "-n",
            kube.namespace,
            "port-forward",
            "--address",
            "127.0.0.1",
            target,
            f":{port}",
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        line = self.process.stdout.readline()
        match = re.search(r"Forwarding from 127\.0\.0\.1:(\d+)", line)
        if match is None:
            self.close()
            raise RuntimeError(f"port-forward {target}: {line}{self.process.stdout.read()}")
        self.url = f"http://127.0.0.1:{match.group(1)}"

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def __enter__(self) -> PortForward:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
