"""A real, local Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok with fake GPU nodes, each its own process on 127.0.0.1.

The binaries come from `make tools` (.tools/bin). The certificates, the service-account key and the
kubeconfigs are made here. Used by the `kube_cluster` pytest fixture and by hand:

    python tests/controlplane.py up      # state in .cluster/, prints the KUBECONFIG to use
    python tests/controlplane.py down
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
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

# kwok only manages nodes that carry this annotation.
FAKE_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"
STARTUP_TIMEOUT_S = 60.0
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
    ) -> None:
        self.bin_dir = bin_dir
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
        self.server = ""
        self._processes: dict[str, subprocess.Popen] = {}

    # -- public API -----------------------------------------------------------------------------

    def start(self) -> None:
        try:
            missing = [tool for tool in TOOLS if not os.access(self.bin_dir / tool, os.X_OK)]
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
        if self._own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

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
        self.server = f"https://127.0.0.1:{api_port}"

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

        self._spawn(
            "kube-apiserver",
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}",
            f"--tls-cert-file={pki['apiserver.crt']}",
            f"--tls-private-key-file={pki['apiserver.key']}",
            f"--client-ca-file={pki['ca.crt']}",
            "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki['sa.pub']}",
            f"--service-account-signing-key-file={pki['sa.key']}",
            # The `kubernetes` Service's endpoints may not be a loopback address.
            "--endpoint-reconciler-type=none",
        )
        admin_context = _client_ssl_context(pki, "admin")
        self._wait(
            "kube-apiserver", lambda: _http_ok(f"{self.server}/readyz", context=admin_context)
        )

        for user in ("admin", "kube-controller-manager", "kube-scheduler"):
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

    def _kubeconfig_path(self, user: str) -> Path:
        return self.kubeconfig if user == "admin" else self.state_dir / f"{user}.kubeconfig"

    def _spawn(self, name: str, *args: str) -> None:
        log = (self.log_dir / f"{name}.log").open("ab")
        # A session of its own per component: stop() kills the whole group, and Ctrl-C in the
        # terminal of `cluster-up` does not reach it.
        self._processes[name] = subprocess.Popen(
            [str(self.bin_dir / name), *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=None if self.outlive_caller else _die_with_parent,
        )
        log.close()

    def _wait(self, name: str, ready: Callable[[], bool], timeout: float = STARTUP_TIMEOUT_S):
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
        raise ControlPlaneError(f"{name} not ready after {timeout:.0f} s\n{self.log_tail(name)}")

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
                "spec": {"podCIDR": f"10.244.{index + 1}.0/24"},
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
        return len(ready) == self.gpu_nodes

    def _default_service_account_exists(self) -> bool:
        try:
            self.kubectl("get", "serviceaccount", "default", "-n", "default")
        except ControlPlaneError:
            return False
        return True


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
    return True


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


# -- certificates and kubeconfigs -----------------------------------------------------------------

# user -> (common name, organization): the names the apiserver's bootstrap RBAC policy knows.
CLIENT_IDENTITIES = {
    "admin": ("kvops-admin", "system:masters"),
    "kube-controller-manager": ("system:kube-controller-manager", None),
    "kube-scheduler": ("system:kube-scheduler", None),
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
        server_ips=["127.0.0.1", str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))],
    )
    for user, (common_name, organization) in CLIENT_IDENTITIES.items():
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if organization:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
        issue(user, x509.Name(attributes), client=True)

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


def _cluster_up(state_dir: Path) -> None:
    pids_file = state_dir / "pids.json"
    if pids_file.exists():
        raise SystemExit(f"a cluster is already up (state in {state_dir}); run `make cluster-down`")
    # Left over from a start that failed: etcd's old data would clash with the new certificates.
    shutil.rmtree(state_dir, ignore_errors=True)
    plane = LocalControlPlane(state_dir=state_dir, outlive_caller=True)
    started = time.monotonic()
    plane.start()
    pids_file.write_text(json.dumps(plane.pids()))
    print(f"cluster up in {time.monotonic() - started:.1f} s at {plane.server}")
    print(f"export KUBECONFIG={plane.kubeconfig}")


def _cluster_down(state_dir: Path) -> None:
    pids_file = state_dir / "pids.json"
    if pids_file.exists():
        for pid in reversed(list(json.loads(pids_file.read_text()).values())):
            _terminate_group(pid)
    shutil.rmtree(state_dir, ignore_errors=True)
    print(f"cluster down, {state_dir} removed")


def main() -> int:
    parser = argparse.ArgumentParser(description="local Kubernetes control plane for kvops tests")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    args = parser.parse_args()
    if args.action == "up":
        _cluster_up(args.state_dir.resolve())
    else:
        _cluster_down(args.state_dir.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
