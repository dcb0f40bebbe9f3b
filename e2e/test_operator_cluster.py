"""The operator against a real control plane (kube-apiserver, etcd, controller manager, scheduler,
kwok's fake GPU nodes): `kvops operator` runs as a subprocess, the resources go in with kubectl.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_helpers import Namespace, install_crds, kvops_output

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Operator:
    """`kvops operator` for one namespace, as a process that tests may kill."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        log: Path,
        priority: int | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log = log
        self.priority = priority
        self.extra_args = extra_args
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        command = [
            sys.executable,
            "-m",
            "kvops.worker.serve.cli",
            "operator",
            "--namespace",
            self.namespace,
            "--liveness",
            f"http://127.0.0.1:{self.liveness_port}/healthz",
            "--metrics-port",
            str(self.metrics_port),
        ]
        if self.priority is not None:
            command += ["--priority", str(self.priority)]
        command += self.extra_args
        with self.log.open("a") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=log)

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node dies."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def reconciles(self) -> float:
        """LLMDeployment reconciles so far, from the operator's own /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        series = 'kvops_operator_reconciles_total{kind="LLMDeployment",result="success"} '
        lines = [line for line in text.splitlines() if line.startswith(series)]
        return float(lines[0].split()[-1]) if lines else 0.0


@pytest.fixture(scope="module")
def namespace(kube_cluster) -> str:
    name = f"kvops-op-{uuid.uuid4().hex[:6]}"
    kube_cluster.kubectl("create", "namespace", name)
    install_crds(kube_cluster)
    return name


def service_account_kubeconfig(cluster, namespace: str, folder: Path) -> Path:
    """A kubeconfig that acts as the operator's ServiceAccount (`kvops rbac`), not as admin."""
    cluster.kubectl("apply", "-f", "-", input=kvops_output("rbac", "--namespace", namespace))
    token = cluster.kubectl(
        "create", "token", "kvops-operator", "-n", namespace, "--duration", "2h"
    ).strip()
    config = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    config["users"] = [{"name": "operator", "user": {"token": token}}]
    for context in config["contexts"]:
        context["context"]["user"] = "operator"
    path = folder / "operator.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def restricted_namespace(cluster, prefix: str) -> Iterator[str]:
    """A fresh namespace that enforces Pod Security `restricted` (the Jobs the operator makes
    must pass it), with the CRDs installed."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    labels = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn")}
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    namespace["metadata"]["labels"] = labels
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(namespace))
    install_crds(cluster)
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false")


@contextlib.contextmanager
def operator_under_its_role(cluster, namespace: str, folder: Path) -> Iterator[Operator]:
    """The operator under its own least-privilege Role: a missing permission fails the tests, and
    so does any handler that raised (kopf retries those, which could hide a broken handler behind
    the 60 s timer)."""
    process = Operator(
        service_account_kubeconfig(cluster, namespace, folder), namespace, folder / "log"
    )
    process.start()
    yield process
    process.stop()
    log = process.log_tail(100000).splitlines()
    crashed = [line for line in log if "with an exception" in line]
    assert not crashed, "handlers raised:\n" + "\n".join(crashed[:10])


@pytest.fixture(scope="module")
def operator(kube_cluster, namespace, tmp_path_factory):
    with operator_under_its_role(
        kube_cluster, namespace, tmp_path_factory.mktemp("operator")
    ) as process:
        yield process


class Kube(Namespace):
    """kubectl in the test namespace; a failed wait shows the operator's log."""

    def __init__(self, cluster, namespace: str, operator: Operator):
        super().__init__(cluster, namespace)
        self.operator = operator

    def diagnostics(self) -> str:
        return f"operator log:\n{self.operator.log_tail()}"

    def wait_available(self, name: str, replicas: int) -> dict[str, Any]:
        def available():
            status = self.status("llmd", name)
            return (
                status
                if status.get("phase") == "Available"
                and status.get("readyReplicas") == replicas
                and status.get("replicas") == replicas
                else None
            )

        return self.wait(f"llmd/{name} Available with {replicas} ready", available)


@pytest.fixture
def kube(kube_cluster, namespace, operator) -> Kube:
    return Kube(kube_cluster, namespace, operator)


def llmd(name: str, **spec: Any) -> dict[str, Any]:
    """An LLMDeployment on CPUs unless `gpus` is given: the fake nodes hold 16 GPUs in all."""
    return {
        "apiVersion": "kvops.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"source": "builtin://smollm2"}, "gpus": 0, **spec},
    }


def pver(name: str, prompt: str, content: str, labels=(), variables=("question",)) -> dict:
    return {
        "apiVersion": "kvops.io/v1alpha1",
        "kind": "PromptVersion",
        "metadata": {"name": name},
        "spec": {
            "promptName": prompt,
            "version": name.rsplit("-", 1)[-1],
            "template": [{"role": "user", "content": content}],
            "variables": [{"name": v} for v in variables],
            "labels": list(labels),
        },
    }


def children(kube: Kube, name: str) -> dict[str, list[dict[str, Any]]]:
    selector = f"kvops.io/llmdeployment={name}"
    return {
        kind: kube.items(kind, selector)
        for kind in ["deployments", "services", "configmaps", "poddisruptionbudgets"]
    }


def pods_running(kube: Kube, name: str) -> list[dict[str, Any]]:
    pods = kube.items("pods", f"app.kubernetes.io/instance={name}")
    return [
        p
        for p in pods
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]


def test_examples_apply_and_list_with_their_columns(kube):
    for example in ["promptversion", "llmdeployment", "vectorindex"]:
        kube("apply", "-f", str(ROOT / "examples" / f"{example}.yaml"))
    header = kube("get", "llmd").splitlines()[0].split()
    assert header == ["NAME", "READY", "ENDPOINT", "MODEL", "PHASE", "AGE"]
    kube.wait_available("smollm2", 1)
    row = kube("get", "llmd", "smollm2", "--no-headers").split()
    assert row[:5] == [
        "smollm2",
        "1/1",
        f"smollm2.{kube.namespace}.svc:8000",
        "builtin://smollm2",
        "Available",
    ]
    listed = kube("get", "kvops", "-o", "name").split()
    assert {
        "llmdeployment.kvops.io/smollm2",
        "promptversion.kvops.io/support-answer-v1",
        "vectorindex.kvops.io/product-docs",
    } <= set(listed)
    kube.wait(
        "the example prompt valid", lambda: kube.status("pver", "support-answer-v1").get("valid")
    )
    # The example's evaluation gates its label: its Job starts once smollm2 is Available, and
    # its pod never finishes on a fake node, so the label waits (e2e/test_operator_prompts.py
    # finishes such pods by hand).
    kube.wait(
        "the example's evaluation Job",
        lambda: kube.items(
            "jobs", "app.kubernetes.io/name=kvops-eval,kvops.io/prompt=support-answer"
        ),
    )
    row = kube("get", "pver", "support-answer-v1", "--no-headers").split()
    assert row[:5] == ["support-answer-v1", "support-answer", "1", "[]", "true"]
    [not_held] = kube.status("pver", "support-answer-v1")["labelsNotHeld"]
    assert not_held["label"] == "production"
    assert not_held["reason"].startswith("waiting for evaluation: the evaluation Job")
    # The example index builds: its claim and Job, no search pod before the build succeeded
    # (e2e/test_vectorindex_cluster.py plays builds to the end; the fake nodes run nothing).
    build = kube.wait(
        "the example index's build", lambda: kube.status("vidx", "product-docs").get("buildHash")
    )
    [job] = kube.wait(
        "the example index's build Job",
        lambda: kube.items("jobs", "kvops.io/vectorindex=product-docs"),
    )
    assert job["metadata"]["name"] == f"product-docs-build-{build}"
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["index", "build"] and args[args.index("--output") + 1] == f"/index/{build}"
    assert kube.get("pvc", f"product-docs-index-{build}") is not None
    assert kube.get("deployment", "product-docs-search") is None
    assert kube.status("vidx", "product-docs").get("servedBuild") is None


def test_llmdeployment_yields_gpu_workers_service_and_prompts(kube):
    kube.apply(pver("greeting-v1", "greeting", "Say hello to {{ question }}", ["production"]))
    kube.apply(llmd("chat", replicas=2, gpus=2, prompts=[{"name": "greeting"}]))
    status = kube.wait_available("chat", 2)
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Available": "True",
        "Progressing": "False",
        "Degraded": "False",
        "Ready": "True",
    }
    assert status["observedGeneration"] == kube.get("llmd", "chat")["metadata"]["generation"]
    deployment = kube.get("deployment", "chat")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["args"][:1] == ["serve"]
    service = kube.get("service", "chat")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8000, "grpc": 50051}

    def prompt_resolved():
        data = (kube.get("configmap", "chat-prompts") or {}).get("data", {})
        greeting = json.loads(data.get("prompts.json", "{}")).get("prompts", {}).get("greeting")
        return greeting if greeting and greeting["labels"] else None

    greeting = kube.wait("the prompt ConfigMap to hold greeting-v1", prompt_resolved)
    assert greeting["labels"] == {"production": "v1"}
    entry = greeting["versions"]["v1"]
    assert entry["promptVersion"] == "greeting-v1"
    assert entry["template"] == [{"role": "user", "content": "Say hello to {{ question }}"}]
    assert len(pods_running(kube, "chat")) == 2
    events = kube(
        "get",
        "events",
        "--field-selector",
        "involvedObject.kind=LLMDeployment,involvedObject.name=chat",
    )
    assert "phase Progressing -> Available" in events
    for pod in pods_running(kube, "chat"):
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_spec_change_rolls_pods_and_scaling_shows_in_status(kube):
    kube.apply(llmd("roll", replicas=1, engine={"maxNumSeqs": 8}))
    kube.wait_available("roll", 1)
    first = kube.get("deployment", "roll")["spec"]["template"]["metadata"]["annotations"]
    kube.apply(llmd("roll", replicas=1, engine={"maxNumSeqs": 16}))

    def max_num_seqs(pod_spec: dict[str, Any]) -> str:
        args = pod_spec["containers"][0]["args"]
        return args[args.index("--max-num-seqs") + 1]

    def rolled():
        pods = pods_running(kube, "roll")
        return len(pods) == 1 and max_num_seqs(pods[0]["spec"]) == "16"

    kube.wait("pods with --max-num-seqs 16", rolled)
    second = kube.get("deployment", "roll")["spec"]["template"]["metadata"]["annotations"]
    assert first["kvops.io/spec-hash"] != second["kvops.io/spec-hash"]
    kube.wait_available("roll", 1)

    kube("scale", "llmd", "roll", "--replicas", "3")
    status = kube.wait_available("roll", 3)
    assert status["ready"] == "3/3"
    assert kube.get("deployment", "roll")["spec"]["replicas"] == 3
    kube("scale", "llmd", "roll", "--replicas", "1")
    kube.wait_available("roll", 1)


def test_deleted_children_come_back_and_deleting_the_resource_collects_them(kube):
    kube.apply(llmd("gc", prompts=[{"name": "nothing-yet"}]))
    kube.wait_available("gc", 1)
    for kind, name in [("service", "gc"), ("configmap", "gc-prompts"), ("deployment", "gc")]:
        uid = kube.get(kind, name)["metadata"]["uid"]
        kube("delete", kind, name, "--wait=true")
        kube.wait(
            f"{kind}/{name} to be recreated",
            lambda kind=kind, name=name, uid=uid: (
                (kube.get(kind, name) or {}).get("metadata", {}).get("uid", uid) != uid
            ),
        )
    kube.wait_available("gc", 1)
    kube("delete", "llmd", "gc", "--wait=true")
    kube.wait(
        "the garbage collector to delete every child",
        lambda: not any(children(kube, "gc").values()) and not pods_running(kube, "gc"),
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda o: o["spec"].pop("model"), "spec.model"),
        (lambda o: o["spec"].update(replicas=-1), "spec.replicas"),
        (lambda o: o["spec"]["model"].update(source="ftp://models/x"), "spec.model.source"),
        (lambda o: o["spec"].update(bogus=1), 'unknown field "spec.bogus"'),
        (
            lambda o: o["spec"].update(autoscaling={"minReplicas": 3, "maxReplicas": 2}),
            "minReplicas must not exceed maxReplicas",
        ),
        (lambda o: o["spec"]["engine"].update(blockSize=12), "spec.engine.blockSize"),
        (
            lambda o: o["spec"].update(tolerations=[{"key": "", "operator": "Equal"}]),
            "a toleration without a key must use operator Exists",
        ),
        (
            lambda o: o["metadata"].update(name="9starts-with-digit"),
            "metadata.name must start with a letter",
        ),
        (lambda o: o["metadata"].update(name="x" * 64), "at most 63 characters"),
        (
            lambda o: o["spec"].update(
                env=[{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]
            ),
            "Duplicate value",
        ),
        (
            lambda o: o["spec"].update(env=[{"name": "KVOPS_PROMPTS_DIR", "value": "/x"}]),
            "this variable is set by the operator",
        ),
        (
            lambda o: o["spec"].update(nodeSelector={"bad key!": "x"}),
            "node selector keys must be label keys",
        ),
    ],
    ids=[
        "missing-model",
        "negative-replicas",
        "bad-source",
        "unknown-field",
        "min-over-max",
        "block-size",
        "empty-toleration-key",
        "name-starts-with-digit",
        "name-too-long",
        "duplicate-env",
        "reserved-env",
        "node-selector-key",
    ],
)
def test_invalid_llmdeployments_are_refused_naming_the_field(kube, change, field):
    obj = llmd("invalid", engine={})
    change(obj)
    assert field in kube.refused(obj)


def test_invalid_vector_index_and_immutable_template_are_refused(kube):
    index = yaml.safe_load((ROOT / "examples" / "vectorindex.yaml").read_text())
    index["metadata"]["name"] = "bad-chunks"
    index["spec"]["chunking"] = {"size": 64, "overlap": 64}
    assert "chunking.overlap must be smaller than chunking.size" in kube.refused(index)

    kube.apply(pver("frozen-v1", "frozen", "{{ question }}"))
    edited = pver("frozen-v1", "frozen", "{{ question }}!")
    message = kube.refused(edited)
    assert "spec.template" in message and "immutable" in message
    # Labels are not part of the template: they may move.
    kube.apply(pver("frozen-v1", "frozen", "{{ question }}", ["canary"]))


def test_prompt_template_errors_and_label_moves(kube):
    kube.apply(pver("broken-v1", "broken", "{{ question }"))
    status = kube.wait(
        "broken-v1 marked invalid", lambda: kube.status("pver", "broken-v1").get("error")
    )
    assert "template[0].content" in status and "unexpected" in status
    assert kube.status("pver", "broken-v1")["valid"] is False

    kube.apply(pver("faq-v1", "faq", "v1: {{ question }}", ["production"]))
    kube.apply(pver("faq-v2", "faq", "v2: {{ question }}"))
    kube.apply(llmd("faq-bot", prompts=[{"name": "faq", "label": "production"}]))

    def served_version():
        data = (kube.get("configmap", "faq-bot-prompts") or {}).get("data", {})
        faq = json.loads(data.get("prompts.json", "{}")).get("prompts", {}).get("faq", {})
        return faq.get("labels", {}).get("production")

    kube.wait("faq-bot's ConfigMap to serve faq-v1", lambda: served_version() == "v1")
    # The newer version asks for the label too: it holds it now. Nobody edits faq-v1's spec:
    # its status says why it no longer holds what it lists.
    kube("patch", "pver", "faq-v2", "--type", "merge", "-p", '{"spec":{"labels":["production"]}}')
    kube.wait("faq-bot's ConfigMap to serve faq-v2", lambda: served_version() == "v2")
    assert kube.get("pver", "faq-v1")["spec"]["labels"] == ["production"]
    kube.wait(
        "faq-v1's status to say why it lost the label",
        lambda: (
            kube.status("pver", "faq-v1").get("labelsNotHeld")
            == [{"label": "production", "reason": "production is held by faq-v2 (newer)"}]
        ),
    )
    kube.wait(
        "faq-v2's status to list faq-bot",
        lambda: (
            kube.status("pver", "faq-v2").get("usedBy") == ["faq-bot"]
            and kube.status("pver", "faq-v2").get("heldLabels") == ["production"]
        ),
    )


def test_operator_killed_mid_reconcile_converges_without_duplicates(kube):
    names = [f"crash-{i}" for i in range(5)]
    kube.operator.kill()
    for name in names:
        kube.apply(llmd(name, replicas=2, prompts=[{"name": "faq"}]))
    kube.operator.start()
    # Kill as soon as the first child appears: the other resources are half done.
    kube.wait(
        "the restarted operator's first Deployment",
        lambda: kube.items("deployments", f"kvops.io/llmdeployment in ({','.join(names)})"),
        timeout=WAIT_S,
    )
    kube.operator.kill()
    unfinished = [n for n in names if kube.status("llmd", n).get("phase") != "Available"]
    assert unfinished, "every resource was done before the kill: nothing was interrupted"
    kube.operator.start()
    for name in names:
        kube.wait_available(name, 2)
        found = children(kube, name)
        assert {kind: len(objs) for kind, objs in found.items()} == {
            "deployments": 1,
            "services": 1,
            "configmaps": 1,
            "poddisruptionbudgets": 1,
        }, name
        replica_sets = kube.items("replicasets", f"app.kubernetes.io/instance={name}")
        assert len(replica_sets) == 1, name
        kube.wait(f"exactly 2 pods of {name}", lambda name=name: len(pods_running(kube, name)) == 2)


def test_operator_serves_liveness_and_metrics(kube):
    def fetch(port: int, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.read().decode()

    kube.apply(llmd("metered"))
    kube.wait_available("metered", 1)
    kube.wait("liveness", lambda: _answers(lambda: fetch(kube.operator.liveness_port, "/healthz")))
    metrics = fetch(kube.operator.metrics_port, "/metrics")
    assert 'kvops_operator_reconciles_total{kind="LLMDeployment",result="success"}' in metrics
    assert "kvops_operator_reconcile_duration_seconds_bucket" in metrics


def _answers(call: Callable[[], str]) -> bool:
    try:
        call()
    except OSError:
        return False
    return True


def degraded(kube: Kube, kind: str, name: str, reason: str) -> dict[str, Any]:
    """Wait for the Degraded condition with `reason`; returns it."""

    def condition():
        for c in kube.status(kind, name).get("conditions", []):
            if c["type"] == "Degraded" and c["status"] == "True" and c["reason"] == reason:
                return c
        return None

    return kube.wait(f"{kind}/{name} Degraded with reason {reason}", condition, timeout=60)


def warning_events(kube: Kube, kind: str, name: str) -> str:
    return kube(
        "get",
        "events",
        "--field-selector",
        f"type=Warning,involvedObject.kind={kind},involvedObject.name={name}",
    )


def test_model_settings_the_worker_cannot_honour_are_refused_with_a_condition(kube):
    # The worker tells the format from the files: another one is refused, not silently ignored.
    obj = llmd("formatted")
    obj["spec"]["model"]["format"] = "safetensors"
    kube.apply(obj)
    condition = degraded(kube, "llmd", "formatted", "UnsupportedFormat")
    assert "set format auto" in condition["message"]
    assert kube.status("llmd", "formatted")["phase"] == "Degraded"
    assert kube.get("deployment", "formatted") is None  # nothing that would crash-loop
    assert "UnsupportedFormat" in warning_events(kube, "LLMDeployment", "formatted")


def test_a_child_the_api_server_refuses_ends_in_degraded_and_one_warning(kube):
    resources = {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}
    kube.apply(llmd("over-limit", resources=resources))
    condition = degraded(kube, "llmd", "over-limit", "ChildRefused")
    assert condition["message"].startswith("Deployment over-limit: ")
    assert "must be less than or equal to memory limit" in condition["message"]
    # The timer reconciles again, the message does not change: still one Warning.
    time.sleep(2)
    kube("annotate", "llmd", "over-limit", "poke=1")
    time.sleep(2)
    assert warning_events(kube, "LLMDeployment", "over-limit").count("ChildRefused") == 1


def test_unschedulable_workers_say_why_within_a_reconcile(kube):
    kube.apply(llmd("nowhere", nodeSelector={"example.com/pool": "missing"}))
    condition = degraded(kube, "llmd", "nowhere", "Unschedulable")
    assert "didn't match Pod's node affinity/selector" in condition["message"]
    obj = llmd("no-claim")
    obj["spec"]["model"]["source"] = "pvc://missing-claim/model"
    kube.apply(obj)
    condition = degraded(kube, "llmd", "no-claim", "Unschedulable")
    assert 'persistentvolumeclaim "missing-claim" not found' in condition["message"]


def test_peering_lets_one_operator_work_at_a_time(kube_cluster, tmp_path):
    namespace = f"kvops-peer-{uuid.uuid4().hex[:6]}"
    kube_cluster.kubectl("create", "namespace", namespace)
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering"}
    peering["metadata"] = {"name": "kvops-operator", "namespace": namespace}
    kube_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(peering))
    low = Operator(kube_cluster.kubeconfig, namespace, tmp_path / "low.log", priority=10)
    high = Operator(kube_cluster.kubeconfig, namespace, tmp_path / "high.log", priority=20)
    low.start()
    try:
        kube = Kube(kube_cluster, namespace, low)
        kube.apply(llmd("first"))
        kube.wait_available("first", 1)

        high.start()
        kube.wait(
            "the low-priority operator to pause", lambda: "Pausing operations" in low.log_tail()
        )
        paused_at = low.reconciles()
        kube.operator = high
        kube.apply(llmd("second"))
        kube.wait_available("second", 1)
        assert high.reconciles() > 0
        assert low.reconciles() == paused_at

        high.stop()  # a clean exit withdraws from the peering at once
        kube.operator = low
        kube.wait("the low-priority operator to resume", lambda: "Resuming" in low.log_tail())
        kube.apply(llmd("third"))
        kube.wait_available("third", 1)
        assert low.reconciles() > paused_at
    finally:
        high.stop()
        low.stop()
        kube_cluster.kubectl("delete", "namespace", namespace, "--wait=false")
