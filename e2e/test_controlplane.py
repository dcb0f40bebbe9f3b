"""The local control plane (e2e/controlplane.py) behaves like a real cluster with GPU nodes."""

from __future__ import annotations

import importlib.util
import json
import sys
import uuid

import pytest
from controlplane import REPO_ROOT, LocalControlPlane
from kube_helpers import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def pinned_kubernetes_version() -> str:
    path = REPO_ROOT / "e2e" / "tools" / "build_tools.py"
    spec = importlib.util.spec_from_file_location("build_tools", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.KUBERNETES_VERSION


def get_json(cluster: LocalControlPlane, *args: str) -> dict:
    return json.loads(cluster.kubectl("get", *args, "-o", "json"))


def condition(obj: dict, kind: str) -> dict:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


@pytest.fixture
def namespace(kube_cluster: LocalControlPlane):
    name = f"test-{uuid.uuid4().hex[:8]}"
    kube_cluster.kubectl("create", "namespace", name)
    yield name
    kube_cluster.kubectl("delete", "namespace", name, "--wait=false")


GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def gpu_deployment(name: str, gpus: int) -> str:
    labels = {"app": name}
    container = {
        "name": "worker",
        "image": "kvops/worker:test",
        "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
    }
    return json.dumps(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    # As the operator's GPU pods: the fake nodes are tainted beside a real node.
                    "spec": {"containers": [container], "tolerations": [GPU_TOLERATION]},
                },
            },
        }
    )


def test_fake_gpu_nodes_are_ready_with_allocatable_gpus(kube_cluster: LocalControlPlane):
    from kubernetes import client

    with kube_cluster.api_client() as api:
        nodes = client.CoreV1Api(api).list_node().items
    assert len(nodes) == kube_cluster.gpu_nodes
    for node in nodes:
        ready = next(c for c in node.status.conditions if c.type == "Ready")
        assert ready.status == "True"
        assert node.status.allocatable["nvidia.com/gpu"] == str(kube_cluster.gpus_per_node)
        assert node.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"


def test_version_is_the_pinned_release(kube_cluster: LocalControlPlane):
    version = json.loads(kube_cluster.kubectl("get", "--raw", "/version"))
    assert version["gitVersion"] == pinned_kubernetes_version()
    client_version = json.loads(kube_cluster.kubectl("version", "--client", "-o", "json"))
    assert client_version["clientVersion"]["gitVersion"] == pinned_kubernetes_version()


def test_gpu_deployment_runs_and_is_garbage_collected(
    kube_cluster: LocalControlPlane, namespace: str
):
    kube_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=gpu_deployment("gpu", 1))

    def ready_pod():
        pods = get_json(kube_cluster, "pods", "-n", namespace, "-l", "app=gpu")["items"]
        return next(
            (
                p
                for p in pods
                if p["status"].get("phase") == "Running"
                and condition(p, "Ready").get("status") == "True"
            ),
            None,
        )

    pod = wait_for("a Running, Ready pod", ready_pod)
    assert pod["spec"]["nodeName"].startswith("kwok-gpu-")
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
    wait_for(
        "the Deployment to report one available replica",
        lambda: (
            get_json(kube_cluster, "deployment", "gpu", "-n", namespace)["status"].get(
                "availableReplicas"
            )
            == 1
        ),
    )

    kube_cluster.kubectl("delete", "deployment", "gpu", "-n", namespace, "--wait=false")

    def children_gone():
        replica_sets = get_json(kube_cluster, "replicasets", "-n", namespace)["items"]
        pods = get_json(kube_cluster, "pods", "-n", namespace)["items"]
        return not replica_sets and not pods

    wait_for("the ReplicaSet and its pods to be garbage-collected", children_gone)


def test_gpu_requests_beyond_a_node_stay_pending(kube_cluster: LocalControlPlane, namespace: str):
    too_many = kube_cluster.gpus_per_node + 1
    kube_cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=gpu_deployment("greedy", too_many)
    )

    def unschedulable_pod():
        pods = get_json(kube_cluster, "pods", "-n", namespace, "-l", "app=greedy")["items"]
        return next(
            (p for p in pods if condition(p, "PodScheduled").get("reason") == "Unschedulable"),
            None,
        )

    pod = wait_for("the scheduler to mark the pod Unschedulable", unschedulable_pod)
    assert "nvidia.com/gpu" in condition(pod, "PodScheduled")["message"]
    assert pod["status"]["phase"] == "Pending"


def test_custom_resource_definition_becomes_established(kube_cluster: LocalControlPlane):
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.test.kvops.io"},
        "spec": {
            "group": "test.kvops.io",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer"}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    kube_cluster.kubectl("apply", "-f", "-", input=json.dumps(crd))
    try:
        kube_cluster.kubectl(
            "wait", "--for=condition=Established", "crd/widgets.test.kvops.io", "--timeout=30s"
        )
        widget = {
            "apiVersion": "test.kvops.io/v1",
            "kind": "Widget",
            "metadata": {"name": "w", "namespace": "default"},
            "spec": {"size": 3},
        }
        kube_cluster.kubectl("apply", "-f", "-", input=json.dumps(widget))
        assert get_json(kube_cluster, "widget", "w", "-n", "default")["spec"]["size"] == 3
    finally:
        kube_cluster.kubectl("delete", "crd", "widgets.test.kvops.io", "--wait=false")
