"""End to end on a real node: the project's images in containerd, a real kubelet, the operator as
a pod from its image, workers answering through their Service.

The session builds the images (e2e/images, cached by content hash), starts the local control
plane with its real node (tests/controlplane.py), imports the images into the node's containerd,
and installs the CRDs, RBAC and the operator into a namespace that enforces Pod Security
`restricted`. Everything listens on 127.0.0.1 or on the cluster's own bridge.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "e2e" / "images")]
from kube_helpers import Namespace, install_crds, kvops_output  # noqa: E402

NAMESPACE = "kvops-e2e"


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.cluster)
        item.add_marker(pytest.mark.slow)


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
