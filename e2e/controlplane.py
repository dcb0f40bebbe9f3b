"""A real, local Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok with fake GPU nodes, each its own process on 127.0.0.1.

With `real_node=True` the cluster also gets one real node, `kvops-node-0`: containerd (Debian's
runc, cgroupfs), a kubelet, kube-proxy (iptables) and a CNI bridge `kvops0` (10.88.0.1/16) that
this module creates, plus local-path-provisioner behind a default StorageClass and CoreDNS as
cluster DNS on the bridge address (`<service>.<namespace>.svc` resolves in pods; nothing is
forwarded past the cluster domain). Pods must reach the API server through the `kubernetes`
Service, and a kubelet refuses a loopback node IP, so in that mode the apiserver and the kubelet
listen on the bridge address instead of 127.0.0.1. Only one real node can run per machine (the
bridge and kube-proxy's iptables chains are host-wide).

The binaries come from `make tools` (.tools/bin). The certificates, the service-account key and the
kubeconfigs are made here. Used by the `kube_cluster` pytest fixture and by hand:

    python e2e/controlplane.py up [--no-real-node]  # state in .cluster/, prints the KUBECONFIG
    python e2e/controlplane.py down
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import hashlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BIN_DIR = REPO_ROOT / ".tools" / "bin"
DEFAULT_STATE_DIR = REPO_ROOT / ".cluster"
KWOK_STAGES = Path(__file__).with_name("kwok_stages.yaml")
TOOLS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kubectl")
NODE_TOOLS = (
    "kubelet",
    "kube-proxy",
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
    "local-path-provisioner",
    "coredns",
)
NODE_SOURCES = REPO_ROOT / "e2e" / "node"
IMAGE_CACHE = Path(
    os.environ.get("KVOPS_IMAGE_CACHE") or Path.home() / ".cache" / "kvops" / "images"
)

# kwok only manages nodes that carry this annotation.
FAKE_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"
STARTUP_TIMEOUT_S = 60.0
# With a real node the fake GPU nodes carry this taint, which GPU pods tolerate (the operator adds
# the toleration): CPU-only pods then land on the real node instead of a fake one where nothing
# runs. Without a real node the fake nodes stay untainted, as the fake-only tests place CPU pods.
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}

# The real node. The bridge doubles as the host's address for pods: the `kubernetes` Service's
# endpoint and the node's InternalIP.
NODE_NAME = "kvops-node-0"
BRIDGE = "kvops0"
BRIDGE_IP = "10.88.0.1"
BRIDGE_CIDR = "10.88.0.0/16"
# Cluster DNS: CoreDNS on the host, answering pods on the bridge address (port 53).
CLUSTER_DOMAIN = "cluster.local"
PAUSE_IMAGE = "kvops.local/pause:1.0"
BUSYBOX_IMAGE = "kvops.local/busybox:1.35"
NODE_READY_TIMEOUT_S = 120.0
STORAGE_NAMESPACE = "local-path-storage"
# Host-wide settings the kubelet, kube-proxy or the CNI bridge change: restored on stop.
SAVED_SYSCTLS = (
    "net.ipv4.ip_forward",
    "net.bridge.bridge-nf-call-iptables",
    "net.ipv4.conf.all.route_localnet",
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
)
# Our own filter chain: pods talk to each other and to the host, never past the bridge.
FORWARD_CHAIN = "KVOPS-NODE-FORWARD"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class ControlPlaneError(RuntimeError):
    """A component failed to start or to become ready; the message carries its log tail."""


class LocalControlPlane:
    """Starts and stops the control plane; `kubeconfig` and `server` describe it once started."""

    def __init__(
        self,
        state_dir: Path | None = None,
        bin_dir: Path = DEFAULT_BIN_DIR,
        gpu_nodes: int = 2,
        gpus_per_node: int = 8,
        outlive_caller: bool = False,
        real_node: bool = False,
    ) -> None:
        self.bin_dir = bin_dir
        self.real_node = real_node
        # Only `cluster-up` leaves the components running after its own process exits.
        self.outlive_caller = outlive_caller
        self.gpu_nodes = gpu_nodes
        self.gpus_per_node = gpus_per_node
        # A state dir given by the caller outlives stop() only when cluster-up keeps it running.
        self._own_state_dir = state_dir is None
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="kvops-cluster-"))
        self.pki_dir = self.state_dir / "pki"
        self.log_dir = self.state_dir / "logs"
        self.kubeconfig = self.state_dir / "admin.kubeconfig"
        self.node_dir = self.state_dir / "node"
        self.containerd_socket = self.node_dir / "containerd" / "containerd.sock"
        self.server = ""
        self._processes: dict[str, subprocess.Popen] = {}

    # -- public API -----------------------------------------------------------------------------

    def start(self) -> None:
        try:
            tools = TOOLS + (NODE_TOOLS if self.real_node else ())
            missing = [tool for tool in tools if not os.access(self.bin_dir / tool, os.X_OK)]
            if missing:
                raise ControlPlaneError(
                    f"missing in {self.bin_dir}: {', '.join(missing)}; "
                    "run `make tools` to build them"
                )
            for folder in (self.pki_dir, self.log_dir):
                folder.mkdir(parents=True, exist_ok=True)
            self._start_all()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        # Reverse start order: clients first, etcd last.
        for name in reversed(list(self._processes)):
            _terminate_group(self._processes.pop(name).pid)
        clean = _clean_up_node(self.state_dir, self.bin_dir)
        if self._own_state_dir and clean:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def import_image(self, archive: Path) -> None:
        """Imports an OCI (or docker) image archive into the real node's containerd.

        The image keeps the name the archive carries (org.opencontainers.image.ref.name); pods
        use it with `imagePullPolicy: Never` or `IfNotPresent`, there is no registry.
        """
        self._ctr("images", "import", str(archive), timeout=300)

    def images(self) -> list[str]:
        """Names of the images the real node's runtime holds."""
        return self._ctr("images", "ls", "-q").split()

    def _ctr(self, *args: str, timeout: float = 60) -> str:
        if not self.real_node:
            raise ControlPlaneError("this control plane has no real node (real_node=False)")
        command = [str(self.bin_dir / "ctr"), "--address", str(self.containerd_socket)]
        result = subprocess.run(
            [*command, "--namespace", "k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise ControlPlaneError(f"ctr {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 60) -> str:
        """Runs the pinned kubectl against this cluster; raises with its stderr on failure."""
        command = [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(
            command, input=input, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def pids(self) -> dict[str, int]:
        """Process (and process group) ids of the running components, in start order."""
        return {name: process.pid for name, process in self._processes.items()}

    def api_client(self):
        """A `kubernetes` python client ApiClient for this cluster."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def __enter__(self) -> LocalControlPlane:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- start-up -------------------------------------------------------------------------------

    def _start_all(self) -> None:
        pki = _make_pki(self.pki_dir)
        etcd_port, etcd_peer_port, api_port = _free_ports(3)
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        # Pods reach the apiserver on the bridge (through the `kubernetes` Service), so with a
        # real node it listens there; the bridge is local to this machine like 127.0.0.1.
        api_ip = BRIDGE_IP if self.real_node else "127.0.0.1"
        self.server = f"https://{api_ip}:{api_port}"
        if self.real_node:
            images = node_image_archives()  # built first: the only step that can take a while
            _set_up_host_network(self.node_dir, self.bin_dir)

        self._spawn(
            "etcd",
            "--name=kvops",
            f"--data-dir={self.state_dir / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}",
            f"--initial-cluster=kvops=http://127.0.0.1:{etcd_peer_port}",
            # Throwaway data: skipping fsync makes every write several times faster.
            "--unsafe-no-fsync",
        )
        self._wait("etcd", lambda: _http_ok(f"{etcd_url}/health"))

        if self.real_node:
            node_flags = [
                # The kubelet's identity (system:node:<name>) is authorized by the Node authorizer
                # and may only change its own Node and pods.
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                f"--kubelet-client-certificate={pki['apiserver-kubelet-client.crt']}",
                f"--kubelet-client-key={pki['apiserver-kubelet-client.key']}",
                f"--kubelet-certificate-authority={pki['ca.crt']}",
                "--kubelet-preferred-address-types=InternalIP",
            ]
        else:
            # The `kubernetes` Service's endpoints may not be a loopback address.
            node_flags = ["--authorization-mode=RBAC", "--endpoint-reconciler-type=none"]
        self._spawn(
            "kube-apiserver",
            f"--etcd-servers={etcd_url}",
            f"--bind-address={api_ip}",
            f"--advertise-address={api_ip}",
            f"--secure-port={api_port}",
            f"--tls-cert-file={pki['apiserver.crt']}",
            f"--tls-private-key-file={pki['apiserver.key']}",
            f"--client-ca-file={pki['ca.crt']}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki['sa.pub']}",
            f"--service-account-signing-key-file={pki['sa.key']}",
            # The aggregation layer, for APIServices such as prometheus-adapter's
            # custom.metrics.k8s.io: the apiserver proxies to them as front-proxy-client,
            # straight to the endpoints (a host process has no ClusterIP route of its own).
            f"--requestheader-client-ca-file={pki['ca.crt']}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki['front-proxy-client.crt']}",
            f"--proxy-client-key-file={pki['front-proxy-client.key']}",
            "--enable-aggregator-routing=true",
            *node_flags,
        )
        admin_context = _client_ssl_context(pki, "admin")
        self._wait(
            "kube-apiserver", lambda: _http_ok(f"{self.server}/readyz", context=admin_context)
        )

        for user in CLIENT_IDENTITIES:
            _write_kubeconfig(self._kubeconfig_path(user), self.server, pki, user)

        self._spawn(
            "kube-controller-manager",
            f"--kubeconfig={self._kubeconfig_path('kube-controller-manager')}",
            "--leader-elect=false",
            "--secure-port=0",
            # Each controller acts as its own service account, as with kubeadm: the manager's
            # identity itself only holds the bootstrap role system:kube-controller-manager.
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki['sa.key']}",
            f"--root-ca-file={pki['ca.crt']}",
            f"--cluster-cidr={POD_CIDR}",
            # The HPA controller looks every 5 s rather than 15 s: autoscaling tests stay short.
            "--horizontal-pod-autoscaler-sync-period=5s",
        )
        self._spawn(
            "kube-scheduler",
            f"--kubeconfig={self._kubeconfig_path('kube-scheduler')}",
            "--leader-elect=false",
            "--secure-port=0",
        )
        key, value = FAKE_NODE_ANNOTATION
        self._spawn(
            "kwok",
            f"--kubeconfig={self.kubeconfig}",
            f"--config={KWOK_STAGES}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={key}={value}",
            f"--cidr={POD_CIDR}",
            "--node-ip=10.244.0.1",
            "--node-lease-duration-seconds=40",
        )
        self._create_fake_nodes()
        self._wait("kwok", self._nodes_ready)
        # The default ServiceAccount shows the controller manager works; pods need it to be
        # admitted.
        self._wait("kube-controller-manager", self._default_service_account_exists)
        if self.real_node:
            self._start_node(pki, images)

    def _kubeconfig_path(self, user: str) -> Path:
        return self.kubeconfig if user == "admin" else self.state_dir / f"{user}.kubeconfig"

    def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        log = (self.log_dir / f"{name}.log").open("ab")
        # A session of its own per component: stop() kills the whole group, and Ctrl-C in the
        # terminal of `cluster-up` does not reach it.
        self._processes[name] = subprocess.Popen(
            [str(self.bin_dir / name), *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=None if self.outlive_caller else _die_with_parent,
        )
        log.close()

    def _wait(
        self,
        name: str,
        ready: Callable[[], bool],
        timeout: float = STARTUP_TIMEOUT_S,
        also_log: tuple[str, ...] = (),
    ):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for component, process in self._processes.items():
                if process.poll() is not None:
                    raise ControlPlaneError(
                        f"{component} exited with code {process.returncode}"
                        f"\n{self.log_tail(component)}"
                    )
            if ready():
                return
            time.sleep(0.2)
        tails = "\n".join(self.log_tail(component) for component in (name, *also_log))
        raise ControlPlaneError(f"{name} not ready after {timeout:.0f} s\n{tails}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return f"(no log at {path})"
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {path} ---\n" + "\n".join(tail)

    def _create_fake_nodes(self) -> None:
        key, value = FAKE_NODE_ANNOTATION
        resources = {
            "cpu": "32",
            "memory": "256Gi",
            "pods": "110",
            "nvidia.com/gpu": str(self.gpus_per_node),
        }
        nodes = [
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": f"kwok-gpu-{index}",
                    "annotations": {key: value},
                    "labels": {
                        "kubernetes.io/hostname": f"kwok-gpu-{index}",
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "type": "kwok",
                        "nvidia.com/gpu.product": GPU_PRODUCT,
                        "nvidia.com/gpu.count": str(self.gpus_per_node),
                    },
                },
                # Each node its own pod range, so that kwok hands out distinct pod IPs.
                "spec": {
                    "podCIDR": f"10.244.{index + 1}.0/24",
                    "taints": [GPU_TAINT] if self.real_node else [],
                },
                # A node's creator (normally its kubelet) reports its capacity.
                "status": {"capacity": resources, "allocatable": resources},
            }
            for index in range(self.gpu_nodes)
        ]
        manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": nodes})
        self.kubectl("create", "-f", "-", input=manifest)

    def _nodes_ready(self) -> bool:
        nodes = json.loads(self.kubectl("get", "nodes", "-o", "json"))["items"]
        ready = [
            node
            for node in nodes
            if any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in node.get("status", {}).get("conditions", [])
            )
        ]
        key, value = FAKE_NODE_ANNOTATION
        fake = [node for node in ready if node["metadata"].get("annotations", {}).get(key) == value]
        return len(fake) == self.gpu_nodes

    def _default_service_account_exists(self) -> bool:
        try:
            self.kubectl("get", "serviceaccount", "default", "-n", "default")
        except ControlPlaneError:
            return False
        return True

    # -- the real node --------------------------------------------------------------------------

    def _start_node(self, pki: dict[str, Path], images: dict[str, Path]) -> None:
        for folder in ("containerd", "cni/net.d", "kubelet", "pod-logs", "local-path"):
            (self.node_dir / folder).mkdir(parents=True, exist_ok=True)
        # PATH: containerd finds its shim there, the shim runc, the kubelet mount and iptables.
        env = dict(os.environ, PATH=f"{self.bin_dir}:{SYSTEM_PATH}")
        config = self.node_dir / "containerd" / "config.toml"
        config.write_text(_containerd_config(self.node_dir, self.containerd_socket))
        (self.node_dir / "cni" / "net.d" / "10-kvops.conflist").write_text(
            json.dumps(_cni_config(self.node_dir), indent=2)
        )
        self._spawn("containerd", f"--config={config}", env=env)
        self._start_cluster_dns()
        self._wait("containerd", self._containerd_serving)
        for archive in images.values():
            self.import_image(archive)

        # The apiserver's kubelet client may use every kubelet API (logs, exec, port-forward):
        # the kubelet asks the apiserver (authorization mode Webhook) instead of allowing all.
        self.kubectl(
            "create",
            "clusterrolebinding",
            "kvops-apiserver-kubelet-client",
            "--clusterrole=system:kubelet-api-admin",
            f"--user={CLIENT_IDENTITIES['apiserver-kubelet-client'][0]}",
        )
        kubelet_port, healthz_port, proxy_healthz_port, proxy_metrics_port = _free_ports(4)
        kubelet_config = self.node_dir / "kubelet" / "config.yaml"
        kubelet_config.write_text(
            yaml.safe_dump(
                _kubelet_config(
                    self.node_dir, self.containerd_socket, pki, kubelet_port, healthz_port
                )
            )
        )
        self._spawn(
            "kubelet",
            f"--config={kubelet_config}",
            f"--kubeconfig={self._kubeconfig_path('kubelet')}",
            f"--root-dir={self.node_dir / 'kubelet'}",
            f"--cert-dir={self.node_dir / 'kubelet' / 'pki'}",
            f"--hostname-override={NODE_NAME}",
            # The kubelet refuses a loopback node IP: it serves on the bridge address, which the
            # apiserver uses for logs, exec and port-forward (InternalIP).
            f"--node-ip={BRIDGE_IP}",
            "--node-labels=kvops.io/real-node=true",
            env=env,
        )
        self._spawn(
            "kube-proxy",
            f"--kubeconfig={self._kubeconfig_path('kube-proxy')}",
            f"--hostname-override={NODE_NAME}",
            "--proxy-mode=iptables",
            # SNAT every Service connection, so replies come back through the host even when a
            # pod reaches a Service backed by itself or by the host (the apiserver).
            "--masquerade-all",
            f"--cluster-cidr={BRIDGE_CIDR}",
            f"--nodeport-addresses={BRIDGE_IP}/32",
            "--iptables-localhost-nodeports=false",
            # 0: leave the host's conntrack table size and timeouts as they are.
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0",
            f"--healthz-bind-address=127.0.0.1:{proxy_healthz_port}",
            f"--metrics-bind-address=127.0.0.1:{proxy_metrics_port}",
            env=env,
        )
        self._wait(
            "kubelet",
            self._real_node_ready,
            timeout=NODE_READY_TIMEOUT_S,
            also_log=("containerd",),
        )
        self._wait("kube-proxy", lambda: _http_ok(f"http://127.0.0.1:{proxy_healthz_port}/healthz"))
        self._start_storage()

    def _start_cluster_dns(self) -> None:
        """CoreDNS on the host at BRIDGE_IP:53, the kubelet's clusterDNS, as a cluster's kube-dns.

        Ready (its `ready` endpoint) once its kubernetes plugin has listed Services and
        endpoints, so the first pod already resolves them.
        """
        (ready_port,) = _free_ports(1)
        corefile = self.node_dir / "Corefile"
        corefile.write_text(_corefile(self.kubeconfig, ready_port))
        self._spawn("coredns", "-conf", str(corefile))
        self._wait("coredns", lambda: _http_ok(f"http://127.0.0.1:{ready_port}/ready"))

    def _containerd_serving(self) -> bool:
        if not self.containerd_socket.exists():
            return False
        try:
            self._ctr("version", timeout=10)
        except (ControlPlaneError, subprocess.TimeoutExpired):
            return False
        return True

    def _real_node_ready(self) -> bool:
        try:
            node = json.loads(self.kubectl("get", "node", NODE_NAME, "-o", "json"))
        except ControlPlaneError:
            return False
        conditions = node.get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _start_storage(self) -> None:
        """local-path-provisioner on the host behind the default StorageClass `local-path`.

        It keeps volumes under the state dir; its helper pods (mkdir/rm of a volume's folder)
        run the busybox image on the real node.
        """
        storage = self.node_dir / "local-path"
        config = self.node_dir / "local-path-config.json"
        config.write_text(
            json.dumps(
                {
                    "nodePathMap": [
                        {"node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": [str(storage)]}
                    ]
                }
            )
        )
        helper_pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "helper-pod"},
            "spec": {
                "containers": [
                    {"name": "helper-pod", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never"}
                ]
            },
        }
        scripts = {
            # 0777: the consuming pod may run as any user, and hostPath volumes ignore fsGroup.
            "setup": '#!/bin/sh\nset -eu\nmkdir -m 0777 -p "$VOL_DIR"\n',
            "teardown": '#!/bin/sh\nset -eu\nrm -rf "$VOL_DIR"\n',
            "helperPod.yaml": yaml.safe_dump(helper_pod),
        }
        manifests = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": STORAGE_NAMESPACE}},
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "local-path-config", "namespace": STORAGE_NAMESPACE},
                "data": scripts,
            },
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "StorageClass",
                "metadata": {
                    "name": "local-path",
                    "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
                },
                "provisioner": "rancher.io/local-path",
                "volumeBindingMode": "WaitForFirstConsumer",
                "reclaimPolicy": "Delete",
            },
        ]
        self.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests}),
        )
        self._spawn(
            "local-path-provisioner",
            "start",
            f"--kubeconfig={self.kubeconfig}",
            f"--config={config}",
            f"--namespace={STORAGE_NAMESPACE}",
            f"--helper-image={BUSYBOX_IMAGE}",
            "--service-account-name=default",
        )


# -- processes ------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    # Runs in the child before exec: the kernel kills it when the thread that started it
    # dies, even by SIGKILL, so a killed test run leaves no cluster behind.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _terminate_group(pid: int, grace_s: float = 10.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _group_alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    _group_alive(pid)


def _group_alive(pid: int) -> bool:
    # Reap the leader when it is our child, so that it does not linger as a zombie.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    # Under cluster-down the group's processes are no children of ours: once dead they stay
    # zombies until init reaps them, which this machine's init may not do at once.
    return any(state != "Z" for state in _group_states(pid))


def _group_states(pgid: int) -> list[str]:
    states = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                states.append(fields[0])
    return states


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


# -- the real node's configuration ----------------------------------------------------------------


def _containerd_config(node_dir: Path, socket_path: Path) -> str:
    """containerd's own config: every path under the node dir, nothing in /run/containerd except
    the shims' sockets (named by a hash of our socket path, so they do not clash)."""
    root = node_dir / "containerd"
    runc = shutil.which("runc", path=SYSTEM_PATH) or "runc"
    return f"""version = 3
root = "{root / "root"}"
state = "{root / "state"}"

[grpc]
  address = "{socket_path}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root / "opt"}"

# NRI would listen on /var/run/nri/nri.sock, outside the node dir; nothing here uses it.
[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    # Built by node_image_archives() and imported before the kubelet starts: no registry here.
    sandbox = "{PAUSE_IMAGE}"

[plugins."io.containerd.cri.v1.runtime"]
  # Pod network namespaces as files under the node dir instead of /var/run/netns.
  netns_mounts_under_state_dir = true
  # This machine withholds CAP_SYS_RESOURCE even from root: a negative oom_score_adj (the
  # kubelet asks -998 for sandboxes) fails in runc ("can't get final child's PID from pipe").
  # Never go below containerd's own score instead.
  restrict_oom_score_adj = true
  cdi_spec_dirs = []
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        # runc's container state under the node dir, so that cleanup finds every container.
        Root = "{root / "runc"}"
        # cgroupfs, like the kubelet: there is no systemd managing cgroups on this machine.
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{node_dir / "cni" / "net.d"}"

[plugins."io.containerd.grpc.v1.cri"]
  # The kubelet proxies exec/attach/port-forward streams to this server.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""


def _cni_config(node_dir: Path) -> dict:
    """Bridge + host-local IPAM on the bridge we created; portmap for hostPort."""
    return {
        "cniVersion": "1.0.0",
        "name": "kvops",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,  # reuses 10.88.0.1 already on the bridge as the pods' gateway
                "ipMasq": False,  # pods never leave this machine
                "hairpinMode": True,  # a pod may reach itself through a Service
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": BRIDGE_CIDR, "gateway": BRIDGE_IP}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(node_dir / "cni" / "ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def _kubelet_config(
    node_dir: Path, socket_path: Path, pki: dict[str, Path], port: int, healthz_port: int
) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # This machine has cgroup v1 (hybrid); kubelet 1.35+ refuses it unless told (KEP-5573).
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "containerRuntimeEndpoint": f"unix://{socket_path}",
        "address": BRIDGE_IP,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "tlsCertFile": str(pki["kubelet-serving.crt"]),
        "tlsPrivateKeyFile": str(pki["kubelet-serving.key"]),
        "rotateCertificates": False,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(pki["ca.crt"])},
        },
        # Webhook: the kubelet asks the apiserver (SubjectAccessReview) about each caller, as on
        # a real cluster; the apiserver's own client is bound to system:kubelet-api-admin.
        "authorization": {"mode": "Webhook"},
        # No swap here, but the check would refuse any machine that has some.
        "failSwapOn": False,
        "podLogsDir": str(node_dir / "pod-logs"),
        "volumePluginDir": str(node_dir / "kubelet" / "volume-plugins"),
        # Evict only when the disk or memory is really exhausted: a busy build disk is normal.
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 99,
        "imageGCLowThresholdPercent": 98,
        # 0: graceful node shutdown needs systemd-logind's inhibitor locks, absent here.
        "shutdownGracePeriod": "0s",
        "resolvConf": "/etc/resolv.conf",
        # Pods (dnsPolicy ClusterFirst) get this nameserver and the search path
        # `<ns>.svc.cluster.local svc.cluster.local cluster.local`, ndots 5.
        "clusterDNS": [BRIDGE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
    }


def _corefile(kubeconfig: Path, ready_port: int) -> str:
    """The cluster domain (and reverse lookups of Service and pod addresses) from the API
    server; NXDOMAIN for every other name, at once: nothing is forwarded, pods never resolve or
    reach anything beyond this machine."""
    return f"""{CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{
    bind {BRIDGE_IP}
    errors
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
    }}
}}

.:53 {{
    bind {BRIDGE_IP}
    errors
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
"""


# -- the real node's host network and cleanup ----------------------------------------------------


def _set_up_host_network(node_dir: Path, bin_dir: Path) -> None:
    """The bridge, before the apiserver binds to its address; sysctls saved for restoring."""
    alias = Path(f"/sys/class/net/{BRIDGE}/ifalias")
    if alias.exists():
        owner = Path(alias.read_text().strip())
        if _processes_naming(owner):
            raise ControlPlaneError(
                f"bridge {BRIDGE} exists: the real node of the cluster in {owner} is up; "
                f"`python e2e/controlplane.py down --state-dir {owner}` removes it"
            )
        # A run killed before its teardown left the node behind; nothing of it runs any more.
        print(f"cleaning up the stale real node of {owner}", file=sys.stderr)
        if not _clean_up_node(owner, bin_dir):
            raise ControlPlaneError(f"the stale real node in {owner} keeps mounts; remove them")
        shutil.rmtree(owner, ignore_errors=True)
    node_dir.mkdir(parents=True, exist_ok=True)
    saved = {name: _sysctl(name) for name in SAVED_SYSCTLS}
    (node_dir / "sysctls.json").write_text(json.dumps(saved))
    _run("ip", "link", "add", BRIDGE, "type", "bridge")
    # The bridge names its owner, for the error above and for cleaning up after a killed run.
    _run("ip", "link", "set", BRIDGE, "alias", str(node_dir.parent))
    _run("ip", "addr", "add", f"{BRIDGE_IP}/{BRIDGE_CIDR.split('/')[1]}", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    # Service addresses lead to the bridge, never to the default route: a ClusterIP that
    # kube-proxy has not programmed (yet) stays on this machine. Goes away with the bridge.
    _run("ip", "route", "add", SERVICE_CIDR, "dev", BRIDGE, "src", BRIDGE_IP)
    # A pod reaching a Service backed by another pod goes out and back in on the bridge: routed,
    # and seen by kube-proxy's iptables rules only with br_netfilter's bridge hook.
    _sysctl("net.ipv4.ip_forward", "1")
    _sysctl("net.bridge.bridge-nf-call-iptables", "1")
    _run("iptables", "-N", FORWARD_CHAIN)
    _run("iptables", "-A", FORWARD_CHAIN, "-i", BRIDGE, "!", "-o", BRIDGE, "-j", "DROP")
    _run("iptables", "-A", FORWARD_CHAIN, "-o", BRIDGE, "!", "-i", BRIDGE, "-j", "DROP")
    _run("iptables", "-I", "FORWARD", "-j", FORWARD_CHAIN)


def _clean_up_node(state_dir: Path, bin_dir: Path) -> bool:
    """Undoes a real node after its processes are gone; False when mounts are left behind.

    Kills what the processes leave running (containers, their shims), unmounts everything under
    the state dir, removes the bridge, kube-proxy's and our iptables rules and the kubelet's
    cgroups, and restores the sysctls. Safe to call when there was no real node.
    """
    node_dir = state_dir / "node"
    if not node_dir.exists():
        return True
    runc_root = node_dir / "containerd" / "runc" / "k8s.io"
    if runc_root.is_dir():
        for container in runc_root.iterdir():
            _run("runc", "--root", str(runc_root), "delete", "--force", container.name, check=False)
    socket_path = str(node_dir / "containerd" / "containerd.sock")
    for pid, shim_socket in _shims_of(socket_path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        shim_socket.unlink(missing_ok=True)  # a killed shim leaves it in /run/containerd/s
    for mount_point in reversed(_mounts_under(state_dir)):
        _run("umount", "--lazy", mount_point, check=False)
    if (bin_dir / "kube-proxy").exists():
        _run(str(bin_dir / "kube-proxy"), "--cleanup", check=False)
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        _run("ip", "link", "del", BRIDGE, check=False)
    _remove_iptables_chains()
    for controller in Path("/sys/fs/cgroup").iterdir():
        _remove_cgroup_tree(controller / "kubepods")
    # The kubelet links every container's log into the fixed /var/log/containers.
    links = Path("/var/log/containers")
    for link in links.glob("*.log") if links.is_dir() else ():
        if os.readlink(link).startswith(str(state_dir) + "/"):
            link.unlink()
    saved = node_dir / "sysctls.json"
    if saved.exists():
        for name, value in json.loads(saved.read_text()).items():
            if value is not None:
                _sysctl(name, value)
        saved.unlink()
    left = _mounts_under(state_dir)
    if left:
        print(f"warning: still mounted, {state_dir} kept: {left}", file=sys.stderr)
    return not left


def _processes_naming(folder: Path) -> list[int]:
    """Pids of the processes whose command line names a path under `folder`."""
    needle = str(folder).encode() + b"/"
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if needle in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
    return found


def _shims_of(socket_path: str) -> list[tuple[int, Path]]:
    """Pid and socket of each containerd shim started by the containerd at `socket_path`.

    Shims re-parent themselves to init, so they are found by their command line
    (`containerd-shim-runc-v2-<version> -namespace NS -id ID -address SOCKET`); containerd names
    a shim's socket /run/containerd/s/<sha256 of SOCKET/NS/ID>."""
    shims = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "containerd-shim-runc-v2" not in Path(argv[0]).name or socket_path not in argv:
            continue
        flags = dict(zip(argv[1::2], argv[2::2], strict=False))
        key = f"{socket_path}/{flags.get('-namespace', '')}/{flags.get('-id', '')}"
        name = hashlib.sha256(key.encode()).hexdigest()
        shims.append((int(entry.name), Path("/run/containerd/s") / name))
    return shims


def _mounts_under(folder: Path) -> list[str]:
    prefix = str(folder) + "/"
    with open("/proc/self/mountinfo") as mountinfo:
        points = [line.split()[4] for line in mountinfo]
    return [point for point in points if point.startswith(prefix)]


def _remove_iptables_chains() -> None:
    """Our FORWARD chain, the kubelet's KUBE-* chains (KUBE-FIREWALL, canaries) that kube-proxy
    --cleanup leaves, and those CNI's portmap plugin leaves (CNI-HOSTPORT-*, CNI-DN-*). Only one
    real node runs per machine, so every such chain here is ours."""
    prefixes = (f":{FORWARD_CHAIN} ", ":KUBE-", ":CNI-HOSTPORT-", ":CNI-DN-")
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            dump = _run(f"{tool}-save", "-t", table, check=False)
            ours = [line.split()[0][1:] for line in dump.splitlines() if line.startswith(prefixes)]
            for line in dump.splitlines():
                words = shlex.split(line)
                jumps = words[words.index("-j") + 1] if "-j" in words else None
                if words[:1] == ["-A"] and words[1] not in ours and jumps in ours:
                    _run(tool, "-t", table, "-D", *words[1:], check=False)
            for chain in ours:
                _run(tool, "-t", table, "-F", chain, check=False)
            for chain in ours:
                _run(tool, "-t", table, "-X", chain, check=False)


def _remove_cgroup_tree(folder: Path) -> None:
    if not folder.is_dir():
        return
    for path, _, _ in sorted(os.walk(folder), key=lambda entry: -len(entry[0])):
        with contextlib.suppress(OSError):
            os.rmdir(path)


def _sysctl(name: str, value: str | None = None) -> str | None:
    path = Path("/proc/sys") / name.replace(".", "/")
    if value is not None:
        path.write_text(value)
    return path.read_text().strip() if path.exists() else None


def _run(*command: str, check: bool = True) -> str:
    # ip, iptables, runc and umount live in sbin, which a user's PATH may lack.
    env = dict(os.environ, PATH=f"{os.environ.get('PATH', '')}:{SYSTEM_PATH}")
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    if check and result.returncode != 0:
        raise ControlPlaneError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result.stdout


# -- the real node's images -----------------------------------------------------------------------


def node_image_archives(cache: Path = IMAGE_CACHE) -> dict[str, Path]:
    """OCI archives of the pause (sandbox) image and a busybox image, built here without a
    registry and cached by the hash of what goes into them."""
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        raise ControlPlaneError("/bin/busybox is missing: `make host-deps` (busybox-static)")
    return {
        PAUSE_IMAGE: _image_archive(cache, PAUSE_IMAGE, [NODE_SOURCES / "pause.c"], _pause_context),
        BUSYBOX_IMAGE: _image_archive(cache, BUSYBOX_IMAGE, [busybox], _busybox_context),
    }


def _pause_context(context: Path) -> str:
    _run("gcc", "-static", "-Os", "-s", "-o", str(context / "pause"), str(NODE_SOURCES / "pause.c"))
    return 'FROM scratch\nCOPY pause /pause\nENTRYPOINT ["/pause"]\n'


def _busybox_context(context: Path) -> str:
    bin_dir = context / "rootfs" / "bin"
    bin_dir.mkdir(parents=True)
    (context / "rootfs" / "tmp").mkdir(mode=0o1777)
    (context / "rootfs" / "tmp").chmod(0o1777)
    shutil.copy2("/bin/busybox", bin_dir / "busybox")
    for applet in _run("/bin/busybox", "--list").split():
        if applet != "busybox":
            (bin_dir / applet).symlink_to("busybox")
    return 'FROM scratch\nCOPY rootfs/ /\nCMD ["/bin/sh"]\n'


def _image_archive(
    cache: Path, name: str, inputs: list[Path], make_context: Callable[[Path], str]
) -> Path:
    digest = hashlib.sha256(name.encode())
    for path in inputs:
        digest.update(path.read_bytes())
    short_name = name.rsplit("/", 1)[-1].replace(":", "-")
    archive = cache / f"{short_name}-{digest.hexdigest()[:16]}.tar"
    if archive.exists():
        return archive
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvops-image-") as tmp:
        context = Path(tmp) / "context"
        context.mkdir()
        (context / "Dockerfile").write_text(make_context(context))
        # A throwaway buildah store (vfs: no overlay mounts), so the host's store stays as it was.
        store = ["--root", f"{tmp}/store", "--runroot", f"{tmp}/run", "--storage-driver", "vfs"]
        _run("buildah", *store, "bud", "--quiet", "--tag", name, str(context))
        partial = archive.with_suffix(".partial")
        _run("buildah", *store, "push", "--quiet", name, f"oci-archive:{partial}:{name}")
        os.replace(partial, archive)
    return archive


# -- certificates and kubeconfigs -----------------------------------------------------------------

# user -> (common name, organization): the names the apiserver's bootstrap RBAC policy knows.
CLIENT_IDENTITIES = {
    "admin": ("kvops-admin", "system:masters"),
    "kube-controller-manager": ("system:kube-controller-manager", None),
    "kube-scheduler": ("system:kube-scheduler", None),
    # The real node's: the Node authorizer knows kubelets by these names.
    "kubelet": (f"system:node:{NODE_NAME}", "system:nodes"),
    "kube-proxy": ("system:kube-proxy", None),  # bound to system:node-proxier by default
    "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", None),
}


def _make_pki(folder: Path) -> dict[str, Path]:
    """A CA, the apiserver's serving certificate, client certificates and the SA key pair."""
    paths: dict[str, Path] = {}

    def write(name: str, data: bytes) -> None:
        paths[name] = folder / name
        paths[name].write_bytes(data)
        paths[name].chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvops-test-ca")])
    ca_cert = _certificate(ca_name, ca_name, ca_key.public_key(), ca_key, is_ca=True)
    write("ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))

    def issue(name: str, subject: x509.Name, **extensions) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(subject, ca_name, key.public_key(), ca_key, **extensions)
        write(f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM))
        write(f"{name}.key", _private_pem(key))

    issue(
        "apiserver",
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
        server_names=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"],
        server_ips=[
            "127.0.0.1",
            BRIDGE_IP,  # where pods and the real node reach it
            str(next(ipaddress.ip_network(SERVICE_CIDR).hosts())),  # the `kubernetes` Service
        ],
    )
    issue(
        "kubelet-serving",
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NODE_NAME)]),
        server_names=[NODE_NAME],
        server_ips=[BRIDGE_IP],
    )
    for user, (common_name, organization) in CLIENT_IDENTITIES.items():
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if organization:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
        issue(user, x509.Name(attributes), client=True)
    # The apiserver's identity towards aggregated API servers (--requestheader-allowed-names).
    issue(
        "front-proxy-client",
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "front-proxy-client")]),
        client=True,
    )

    # Service-account tokens are signed with RSA, the algorithm every verifier accepts.
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write("sa.key", _private_pem(sa_key))
    write(
        "sa.pub",
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    return paths


def _certificate(
    subject: x509.Name,
    issuer: x509.Name,
    public_key,
    signing_key,
    is_ca: bool = False,
    client: bool = False,
    server_names: list[str] = (),
    server_ips: list[str] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
            critical=False,
        )
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if server_names or server_ips:
        alternative_names = [x509.DNSName(name) for name in server_names] + [
            x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips
        ]
        builder = builder.add_extension(
            x509.SubjectAlternativeName(alternative_names), critical=False
        ).add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    if client:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(signing_key, hashes.SHA256())


def _private_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _client_ssl_context(pki: dict[str, Path], user: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca.crt"]))
    context.load_cert_chain(str(pki[f"{user}.crt"]), str(pki[f"{user}.key"]))
    return context


def _write_kubeconfig(path: Path, server: str, pki: dict[str, Path], user: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kvops-local",
                "cluster": {"server": server, "certificate-authority": str(pki["ca.crt"])},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate": str(pki[f"{user}.crt"]),
                    "client-key": str(pki[f"{user}.key"]),
                },
            }
        ],
        "contexts": [{"name": "kvops-local", "context": {"cluster": "kvops-local", "user": user}}],
        "current-context": "kvops-local",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


# -- cluster-up / cluster-down ------------------------------------------------------------------


def _import_project_images(plane: LocalControlPlane) -> None:
    """The worker and operator images `make images` built (cached: seconds when unchanged), so
    that resources naming the default images run on the real node without a registry."""
    sys.path.insert(0, str(REPO_ROOT / "e2e" / "images"))
    from build_images import build_images

    for reference, archive in build_images().items():
        started = time.monotonic()
        plane.import_image(archive)
        print(f"imported {reference} in {time.monotonic() - started:.0f} s")


def _cluster_up(state_dir: Path, real_node: bool, import_images: bool) -> None:
    pids_file = state_dir / "pids.json"
    if pids_file.exists():
        raise SystemExit(f"a cluster is already up (state in {state_dir}); run `make cluster-down`")
    # Left over from a start that failed: etcd's old data would clash with the new certificates.
    shutil.rmtree(state_dir, ignore_errors=True)
    plane = LocalControlPlane(state_dir=state_dir, outlive_caller=True, real_node=real_node)
    started = time.monotonic()
    plane.start()
    pids_file.write_text(json.dumps(plane.pids()))
    print(f"cluster up in {time.monotonic() - started:.1f} s at {plane.server}")
    if real_node:
        print(f"real node {NODE_NAME}; containerd at {plane.containerd_socket}")
        if import_images:
            _import_project_images(plane)
    print(f"export KUBECONFIG={plane.kubeconfig}")


def _cluster_down(state_dir: Path, bin_dir: Path = DEFAULT_BIN_DIR) -> None:
    pids_file = state_dir / "pids.json"
    if pids_file.exists():
        for pid in reversed(list(json.loads(pids_file.read_text()).values())):
            _terminate_group(pid)
    if not _clean_up_node(state_dir, bin_dir):
        raise SystemExit(f"cluster down, but {state_dir} still has mounts: not removed")
    shutil.rmtree(state_dir, ignore_errors=True)
    print(f"cluster down, {state_dir} removed")


def main() -> int:
    parser = argparse.ArgumentParser(description="local Kubernetes control plane for kvops tests")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument(
        "--no-real-node",
        dest="real_node",
        action="store_false",
        help="only kwok's fake GPU nodes (no kubelet, containerd, kube-proxy, storage)",
    )
    parser.add_argument(
        "--import-images",
        action="store_true",
        help="import the worker and operator images (e2e/images) into the real node",
    )
    args = parser.parse_args()
    if args.action == "up":
        _cluster_up(args.state_dir.resolve(), args.real_node, args.import_images)
    else:
        _cluster_down(args.state_dir.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
