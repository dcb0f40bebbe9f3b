"""The local cluster's real node (LocalControlPlane(real_node=True)) runs real pods.

A kubelet with containerd and runc, the CNI bridge, kube-proxy and local-path-provisioner: pods
run busybox images built here, read and write volumes, reach the API server through the
`kubernetes` Service, resolve Services by name (CoreDNS) and reach them by their ClusterIP, and
are reached by the host and by `kubectl port-forward`.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest
from controlplane import (
    BUSYBOX_IMAGE,
    NODE_NAME,
    PAUSE_IMAGE,
    ControlPlaneError,
    LocalControlPlane,
    node_image_archives,
)
from kube_helpers import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# What Pod Security's `restricted` level asks of every container.
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
RESTRICTED_POD = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "fsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}


@pytest.fixture(scope="module")
def real_cluster(cluster):
    """The session's real-node cluster (e2e/conftest.py): one real node per machine."""
    return cluster


@pytest.fixture
def namespace(real_cluster: LocalControlPlane):
    name = f"real-{uuid.uuid4().hex[:8]}"
    manifest = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "labels": {"pod-security.kubernetes.io/enforce": "restricted"},
        },
    }
    real_cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    wait_for(
        "the namespace's default ServiceAccount",
        lambda: _succeeds(real_cluster, "get", "serviceaccount", "default", "-n", name),
    )
    yield name
    real_cluster.kubectl("delete", "namespace", name, "--wait=false")


def _succeeds(cluster: LocalControlPlane, *args: str) -> bool:
    try:
        cluster.kubectl(*args)
    except ControlPlaneError:
        return False
    return True


def get_json(cluster: LocalControlPlane, *args: str) -> dict:
    return json.loads(cluster.kubectl("get", *args, "-o", "json"))


def busybox_pod(name: str, command: str, **spec: object) -> dict:
    container = {
        "name": "main",
        "image": BUSYBOX_IMAGE,
        "imagePullPolicy": "Never",
        "command": ["sh", "-c", command],
        "securityContext": RESTRICTED_CONTAINER,
    }
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": RESTRICTED_POD,
            "terminationGracePeriodSeconds": 1,
            "containers": [container],
            **spec,
        },
    }


def apply(cluster: LocalControlPlane, namespace: str, *objects: dict) -> None:
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)


def wait_for_phase(
    cluster: LocalControlPlane, namespace: str, name: str, phase: str, timeout: float = 90
) -> dict:
    def reached():
        pod = get_json(cluster, "pod", name, "-n", namespace)
        if pod["status"].get("phase") == "Failed" and phase != "Failed":
            logs = cluster.kubectl("logs", "-n", namespace, name)
            raise AssertionError(f"pod {name} failed: {pod['status']}\n{logs}")
        return pod if pod["status"].get("phase") == phase else None

    try:
        return wait_for(f"pod {name} to be {phase}", reached, timeout)
    except AssertionError:
        print(cluster.kubectl("describe", "pod", name, "-n", namespace))
        raise


def test_real_node_is_ready_and_fake_gpu_nodes_are_tainted(real_cluster: LocalControlPlane):
    node = get_json(real_cluster, "node", NODE_NAME)
    assert "nvidia.com/gpu" not in node["status"]["allocatable"]
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == "10.88.0.1"
    fake = [
        n for n in get_json(real_cluster, "nodes")["items"] if n["metadata"]["name"] != NODE_NAME
    ]
    assert len(fake) == real_cluster.gpu_nodes
    for n in fake:
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in n["spec"][
            "taints"
        ]


def test_imported_images_keep_their_names(real_cluster: LocalControlPlane):
    real_cluster.import_image(node_image_archives()[BUSYBOX_IMAGE])  # again: a no-op
    images = real_cluster.images()
    assert PAUSE_IMAGE in images
    assert BUSYBOX_IMAGE in images


def test_restricted_namespace_rejects_a_pod_running_as_root(
    real_cluster: LocalControlPlane, namespace: str
):
    # (privileged: true is refused before that: the apiserver runs without --allow-privileged)
    pod = busybox_pod("root", "true", securityContext={}, container={"securityContext": {}})
    with pytest.raises(ControlPlaneError, match='violates PodSecurity "restricted:latest"'):
        apply(real_cluster, namespace, pod)


def test_restricted_pod_runs_to_completion_and_its_log_is_read(
    real_cluster: LocalControlPlane, namespace: str
):
    apply(real_cluster, namespace, busybox_pod("hello", "echo hello from $(hostname); id -u"))
    pod = wait_for_phase(real_cluster, namespace, "hello", "Succeeded")
    assert pod["spec"]["nodeName"] == NODE_NAME
    assert pod["status"]["podIP"].startswith("10.88.")
    logs = real_cluster.kubectl("logs", "-n", namespace, "hello")
    assert logs.splitlines() == ["hello from hello", "10001"]


def test_pod_writes_into_a_dynamically_provisioned_volume(
    real_cluster: LocalControlPlane, namespace: str
):
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data"},
        # No storageClassName: the default class (local-path) provisions it.
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}},
    }
    pod = busybox_pod(
        "writer",
        "echo written > /data/file && cat /data/file && id -G",
        volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
        container={"volumeMounts": [{"name": "data", "mountPath": "/data"}]},
    )
    apply(real_cluster, namespace, claim, pod)
    wait_for_phase(real_cluster, namespace, "writer", "Succeeded", timeout=120)
    assert real_cluster.kubectl("logs", "-n", namespace, "writer").splitlines()[0] == "written"
    claim = get_json(real_cluster, "pvc", "data", "-n", namespace)
    assert claim["status"]["phase"] == "Bound"
    assert claim["spec"]["storageClassName"] == "local-path"
    volume = get_json(real_cluster, "pv", claim["spec"]["volumeName"])
    path = (volume["spec"].get("hostPath") or volume["spec"]["local"])["path"]
    assert path.startswith(str(real_cluster.state_dir))
    with open(f"{path}/file") as written:
        assert written.read() == "written\n"


def test_pod_reaches_the_api_server_through_the_kubernetes_service(
    real_cluster: LocalControlPlane, namespace: str
):
    # The Service's address from the environment the kubelet sets (by name: the DNS test).
    # busybox's TLS cannot negotiate with the apiserver (handshake failure, alert 40), so the pod
    # sends plain HTTP: Go's TLS server answers that with a 400 of its own, which shows the
    # connection reached the apiserver through kube-proxy's rules for the Service.
    command = (
        "echo $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT"
        r' && printf "GET /version HTTP/1.0\r\n\r\n"'
        " | nc -w 5 $KUBERNETES_SERVICE_HOST $KUBERNETES_SERVICE_PORT"
    )
    apply(real_cluster, namespace, busybox_pod("api-client", command))
    wait_for_phase(real_cluster, namespace, "api-client", "Succeeded")
    logs = real_cluster.kubectl("logs", "-n", namespace, "api-client")
    assert logs.splitlines()[0] == "10.96.0.1:443"
    assert "Client sent an HTTP request to an HTTPS server." in logs


def serve_web_page(real_cluster: LocalControlPlane, namespace: str, page: str) -> str:
    """A busybox httpd pod `web` serving `page` behind a Service `web` (port 80); waits until the
    pod is Ready and the Service's ClusterIP answers, and returns that ClusterIP."""
    # httpd serves from an emptyDir: the root filesystem is read-only.
    server = busybox_pod(
        "web",
        f"echo {page} > /www/index.html && exec httpd -f -p 8080 -h /www",
        restartPolicy="Always",
        volumes=[{"name": "www", "emptyDir": {}}],
        container={
            "volumeMounts": [{"name": "www", "mountPath": "/www"}],
            "ports": [{"containerPort": 8080}],
            "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
        },
    )
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    apply(real_cluster, namespace, server, service)
    real_cluster.kubectl(
        "wait", "-n", namespace, "--for=condition=Ready", "pod/web", "--timeout=90s", timeout=100
    )
    cluster_ip = get_json(real_cluster, "service", "web", "-n", namespace)["spec"]["clusterIP"]
    # kube-proxy programs the Service's rules shortly after its endpoints appear.
    wait_for("the Service's ClusterIP to answer", lambda: _answers(f"http://{cluster_ip}/"), 30)
    return cluster_ip


def test_host_reaches_a_pod_by_its_ip_its_service_and_port_forward(
    real_cluster: LocalControlPlane, namespace: str
):
    cluster_ip = serve_web_page(real_cluster, namespace, "served")
    pod = get_json(real_cluster, "pod", "web", "-n", namespace)

    def get(url: str) -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()

    assert get(f"http://{pod['status']['podIP']}:8080/") == "served\n"
    assert get(f"http://{cluster_ip}/") == "served\n"

    forward = subprocess.Popen(
        [
            str(real_cluster.bin_dir / "kubectl"),
            "--kubeconfig",
            str(real_cluster.kubeconfig),
            "port-forward",
            "-n",
            namespace,
            "pod/web",
            ":8080",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = forward.stdout.readline()  # "Forwarding from 127.0.0.1:NNNNN -> 8080"
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, f"unexpected port-forward output: {line!r}"
        assert get(f"http://127.0.0.1:{match.group(1)}/") == "served\n"
    finally:
        forward.terminate()
        forward.wait(timeout=10)


# Runs in a pod: resolves each name with the libc resolver (the pod's resolv.conf: cluster DNS,
# search path), fetches the first one over HTTP, and times a name outside the cluster domain.
RESOLVE_AND_FETCH = """
import socket, sys, time, urllib.request
for name in sys.argv[1:]:
    print(name, socket.gethostbyname(name))
print(urllib.request.urlopen(f"http://{sys.argv[1]}/", timeout=5).read().decode(), end="")
started = time.monotonic()
try:
    socket.gethostbyname("example.com")
    print("example.com resolved")
except socket.gaierror as error:
    print("example.com", error.errno == socket.EAI_NONAME, round(time.monotonic() - started, 1))
"""


def test_pod_resolves_services_by_name_and_reaches_one_by_its_cluster_ip(
    real_cluster: LocalControlPlane, namespace: str, images: dict[str, Path]
):
    cluster_ip = serve_web_page(real_cluster, namespace, "served by name")

    # The operator image: a Debian userland whose glibc resolver follows the pod's resolv.conf.
    python_image = next(reference for reference in images if "kvops-operator" in reference)
    names = [f"web.{namespace}.svc", "web", "kubernetes.default.svc"]
    client = busybox_pod(
        "resolver",
        "",
        container={
            "image": python_image,
            "command": ["python3", "-c", RESOLVE_AND_FETCH, *names],
        },
    )
    apply(real_cluster, namespace, client)
    wait_for_phase(real_cluster, namespace, "resolver", "Succeeded")
    lines = real_cluster.kubectl("logs", "-n", namespace, "resolver").splitlines()
    assert lines[:4] == [
        f"web.{namespace}.svc {cluster_ip}",
        f"web {cluster_ip}",  # the search path's <namespace>.svc.cluster.local
        "kubernetes.default.svc 10.96.0.1",
        "served by name",
    ]
    # Nothing is forwarded off the machine: a name outside the cluster fails at once (NXDOMAIN).
    outside, no_such_name, seconds = lines[4].split()
    assert (outside, no_such_name) == ("example.com", "True")
    assert float(seconds) < 2


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False
