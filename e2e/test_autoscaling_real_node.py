"""Autoscaling on the real node, through the metrics path the chart sets up: a real Prometheus
(Debian's binary, on this host) scrapes the worker pods on the bridge every second;
prometheus-adapter (built by `make tools`, on this host, registered as the
custom.metrics.k8s.io APIService) serves their gauges with the chart's own rules; the HPA
controller in kube-controller-manager scales the LLMDeployment from 1 to 2 replicas while its
queue is full, and back to 1 after the load."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from controlplane import BRIDGE_IP, ControlPlaneError
from kube_helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
ADAPTER_RULES = ROOT / "charts" / "kvops" / "files" / "autoscaling" / "prometheus-adapter.yaml"
ADAPTER = ROOT / ".tools" / "bin" / "prometheus-adapter"
NAME = "autoscaled"
METRIC = "kvops_num_requests_waiting"
WORKER_READY_S = 300  # as in test_real_pods: a loaded 2-core VM
SCALE_S = 240  # each way: scrape, adapter, HPA sync (5 s here), scale subresource, Deployment
# One running sequence per pod: the third of three concurrent requests waits, so the first pod
# reports a queue of 2 against a target of 1 per pod.
CONCURRENT_REQUESTS = 3
# Short answers: the queue stays full as long as requests keep coming, and the last ones, served
# one after another, still finish within the timeout on a loaded machine.
MAX_TOKENS = 64
REQUEST_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def quantity(text: str) -> float:
    """A metric value as the custom metrics API writes it ("2", "1500m")."""
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def wait_ready(url: str, what: str, process: subprocess.Popen, log: Path, timeout: float = 60):
    def ready():
        if process.poll() is not None:
            pytest.fail(f"{what} exited {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
        return False

    wait_for(f"{what} ready", ready, timeout, diagnostics=lambda: log.read_text()[-3000:])


@contextlib.contextmanager
def host_process(command: list[str], log: Path) -> Iterator[subprocess.Popen]:
    with log.open("ab") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


class WorkerTargets(threading.Thread):
    """The worker pods as Prometheus file_sd targets, rewritten every second. Debian builds
    Prometheus without kubernetes_sd (its client-go dependencies are not packaged), so the test
    discovers the pods itself from the apiserver and labels them as the chart's PodMonitor does:
    port "http", labels namespace, pod and llmdeployment."""

    def __init__(self, kube, path: Path):
        super().__init__(daemon=True)
        self.kube = kube
        self.path = path
        self.stopping = threading.Event()
        self.write()  # Prometheus reads the file at start

    def write(self) -> None:
        groups = [
            {
                "targets": [f"{pod['status']['podIP']}:8000"],
                "labels": {
                    "namespace": pod["metadata"]["namespace"],
                    "pod": pod["metadata"]["name"],
                    "llmdeployment": pod["metadata"]["labels"]["kvops.io/llmdeployment"],
                },
            }
            for pod in self.kube.items("pods", "app.kubernetes.io/name=kvops-worker")
            if pod["status"].get("podIP") and pod["status"].get("phase") == "Running"
        ]
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(groups))
        partial.replace(self.path)  # never a half-written file

    def run(self) -> None:
        while not self.stopping.wait(1.0):
            with contextlib.suppress(Exception):  # a failed listing: next second's try
                self.write()


@pytest.fixture(scope="module")
def prometheus(kube, tmp_path_factory) -> Iterator[str]:
    """Prometheus scraping the kvops worker pods of the e2e namespace every second."""
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus package is missing: `make host-deps` installs it"
    folder = tmp_path_factory.mktemp("prometheus")
    targets = WorkerTargets(kube, folder / "workers.json")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "kvops-workers",
                "file_sd_configs": [{"files": [str(targets.path)], "refresh_interval": "1s"}],
            }
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        binary,
        f"--config.file={folder / 'prometheus.yml'}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
    ]
    log = folder / "prometheus.log"
    targets.start()
    try:
        with host_process(command, log) as process:
            wait_ready(f"{url}/-/ready", "prometheus", process, log)
            yield url
    finally:
        targets.stopping.set()
        targets.join(timeout=10)


def apiservice_objects(namespace: str, port: int) -> list[dict[str, Any]]:
    """The adapter on this host, behind a Service without selector whose endpoint is the bridge
    address (the apiserver routes to endpoints: --enable-aggregator-routing)."""
    name = "prometheus-adapter"
    meta = {"name": name, "namespace": namespace}
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": meta,
         "spec": {"ports": [{"name": "https", "port": port, "targetPort": port}]}},
        {"apiVersion": "v1", "kind": "Endpoints", "metadata": meta,
         "subsets": [{"addresses": [{"ip": BRIDGE_IP}],
                      "ports": [{"name": "https", "port": port}]}]},
        {"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
         "metadata": {"name": "v1beta1.custom.metrics.k8s.io"},
         "spec": {"service": {"name": name, "namespace": namespace, "port": port},
                  "group": "custom.metrics.k8s.io", "version": "v1beta1",
                  "insecureSkipTLSVerify": True,
                  "groupPriorityMinimum": 100, "versionPriority": 100}},
    ]  # fmt: skip


@pytest.fixture(scope="module")
def custom_metrics(cluster, kube, prometheus, tmp_path_factory) -> Iterator[None]:
    """prometheus-adapter with the chart's rules, serving custom.metrics.k8s.io."""
    assert ADAPTER.exists(), "prometheus-adapter is missing: `make tools` builds it"
    folder = tmp_path_factory.mktemp("adapter")
    port = free_port()
    kubeconfig = str(cluster.kubeconfig)
    command = [
        str(ADAPTER),
        f"--config={ADAPTER_RULES}",
        f"--prometheus-url={prometheus}",
        # New pods' series are found by relisting: every 5 s here, 1 m in the chart.
        "--metrics-relist-interval=5s",
        f"--lister-kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        f"--bind-address={BRIDGE_IP}",
        f"--secure-port={port}",
        f"--cert-dir={folder / 'certs'}",
        "--v=2",
    ]
    log = folder / "adapter.log"
    objects = apiservice_objects("kube-system", port)
    with host_process(command, log) as process:
        manifest = yaml.safe_dump_all(objects)
        cluster.kubectl("apply", "-f", "-", input=manifest)

        def available():
            if process.poll() is not None:
                pytest.fail(f"prometheus-adapter exited:\n{log.read_text()[-3000:]}")
            service = json.loads(
                cluster.kubectl("get", "apiservice", "v1beta1.custom.metrics.k8s.io", "-o", "json")
            )
            conditions = service.get("status", {}).get("conditions", [])
            return any(c["type"] == "Available" and c["status"] == "True" for c in conditions)

        wait_for(
            "the custom.metrics.k8s.io APIService Available",
            available,
            90,
            diagnostics=lambda: log.read_text()[-3000:],
        )
        try:
            yield
        finally:
            cluster.kubectl(
                "delete", "--ignore-not-found", "--wait=false", "-f", "-", input=manifest
            )


def autoscaled_llmd() -> dict[str, Any]:
    return {
        "apiVersion": "kvops.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": NAME},
        "spec": {
            "model": {"source": "builtin://smollm2", "dtype": "float32"},
            "gpus": 0,
            "engine": {"maxNumSeqs": 1},
            "autoscaling": {
                "minReplicas": 1,
                "maxReplicas": 2,
                "metric": "queueDepth",
                "target": 1,
                "scaleDownStabilizationSeconds": 10,
            },
        },
    }


def live_worker_pods(kube) -> list[dict[str, Any]]:
    pods = kube.items("pods", f"kvops.io/llmdeployment={NAME}")
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def desired_replicas(kube) -> int:
    return (kube.get("llmd", NAME) or {}).get("spec", {}).get("replicas", 0)


def pod_metric(cluster, namespace: str) -> dict[str, float]:
    """{pod: value} of the queue gauge as the HPA controller reads it."""
    path = f"/apis/custom.metrics.k8s.io/v1beta1/namespaces/{namespace}/pods/*/{METRIC}"
    try:
        items = json.loads(cluster.kubectl("get", "--raw", path))["items"]
    except ControlPlaneError as error:
        if "could not find the metric" in str(error):  # not scraped, or not relisted yet
            return {}
        raise
    return {item["describedObject"]["name"]: quantity(item["value"]) for item in items}


class QueueLoad:
    """CONCURRENT_REQUESTS long greedy completions kept in flight against one worker pod until
    stopped; every request is bounded by the client's timeout."""

    def __init__(self, pod_ip: str):
        self.client = openai.OpenAI(
            base_url=f"http://{pod_ip}:8000/v1",
            api_key="unused",
            max_retries=0,
            timeout=REQUEST_TIMEOUT_S,
        )
        self.stopping = threading.Event()
        self.errors: list[str] = []
        self.completed = 0
        self.threads = [threading.Thread(target=self._loop) for _ in range(CONCURRENT_REQUESTS)]

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.client.chat.completions.create(
                    model=NAME,
                    messages=[{"role": "user", "content": "Tell a long story about a lighthouse."}],
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                )
                self.completed += 1
            except openai.OpenAIError as error:
                self.errors.append(str(error))
                return

    def __enter__(self) -> QueueLoad:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopped_at = time.monotonic()  # no new requests from here
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=REQUEST_TIMEOUT_S + 10)
        self.drained_s = time.monotonic() - self.stopped_at


def test_queue_metric_scales_1_to_2_under_load_and_back(cluster, kube, custom_metrics):
    kube.apply(autoscaled_llmd())
    try:
        hpa = kube.wait("the operator's HPA", lambda: kube.get("hpa", NAME), 60)
        assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 10
        kube.wait(
            f"llmd/{NAME} Available",
            lambda: kube.status("llmd", NAME).get("phase") == "Available",
            WORKER_READY_S,
        )
        [pod] = live_worker_pods(kube)
        # Idle: the adapter serves the pod's gauge (0) through the aggregated API.
        idle = kube.wait(
            "the queue gauge of the pod through custom.metrics.k8s.io",
            lambda: pod_metric(cluster, kube.namespace),
            60,
        )
        assert idle == {pod["metadata"]["name"]: 0}
        assert desired_replicas(kube) == 1

        started = time.monotonic()
        with QueueLoad(pod["status"]["podIP"]) as load:
            kube.wait(
                "requests waiting on the first pod",
                lambda: pod_metric(cluster, kube.namespace).get(pod["metadata"]["name"], 0) >= 1,
                SCALE_S,
            )
            kube.wait("the HPA to set 2 replicas", lambda: desired_replicas(kube) == 2, SCALE_S)
            scaled_up_s = time.monotonic() - started
            # What the HPA controller read: the queue gauge, above the target of 1 per pod.
            [current] = kube.get("hpa", NAME)["status"]["currentMetrics"]
            assert current["pods"]["metric"]["name"] == METRIC
            assert quantity(current["pods"]["current"]["averageValue"]) >= 1
            kube.wait("a second worker pod", lambda: len(live_worker_pods(kube)) == 2, 60)
            assert not load.errors, load.errors
        assert not load.errors, load.errors
        print(f"scaled up {scaled_up_s:.0f} s after the load began; {load.completed} answered")

        kube.wait("the HPA to go back to 1 replica", lambda: desired_replicas(kube) == 1, SCALE_S)
        scaled_down_s = time.monotonic() - load.stopped_at
        kube.wait("one worker pod left", lambda: len(live_worker_pods(kube)) == 1, SCALE_S)
        print(
            f"back to 1 replica {scaled_down_s:.0f} s after the last new request (the requests "
            f"in flight took {load.drained_s:.0f} s more; scale-down window 10 s)"
        )
    finally:
        kube("delete", "llmd", NAME, "--ignore-not-found", "--wait=false")
