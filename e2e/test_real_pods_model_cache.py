"""hf:// models on a real node: an LLMDeployment whose model comes from a Hub (tests/hub_server.py
on the host's bridge address, which pods reach) pulls it once in its `model-pull` init container
into a shared cache claim, answers, and shows the resolved commit in its status; a second
replica and a second LLMDeployment of the same revision download nothing (the Hub's request log
says so); a repository the Hub does not have says why within a minute."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from conftest import PortForward
from controlplane import BRIDGE_IP
from hub_server import HubServer
from model_folder import write_smollm2_folder

WORKER_READY_S = 300  # schedule, pull ~270 MB, import torch, load, on a loaded 2-core VM
DIAGNOSIS_S = 60
REPO = "org/smollm2"
WEIGHTS = "model.safetensors"
CLAIM = "kvops-model-cache"
KEPT = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
        "tokenizer_config.json")  # fmt: skip


@pytest.fixture(scope="module")
def hub(kube, tmp_path_factory):
    """The Hub on the bridge (kvops0 exists once the cluster is up), serving SmolLM2 as
    safetensors; the shared cache claim, bound by the default StorageClass on first use."""
    folder = write_smollm2_folder(tmp_path_factory.mktemp("smollm2"))
    with HubServer(host=BRIDGE_IP) as server:
        server.commit = server.add_repo(REPO, folder)  # type: ignore[attr-defined]
        server.folder = folder  # type: ignore[attr-defined]
        kube.apply(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": CLAIM},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],  # one node: every pod shares it
                    "resources": {"requests": {"storage": "2Gi"}},
                },
            }
        )
        yield server
        for name in ("hf-chat", "hf-chat-2", "hf-missing"):
            kube("delete", "llmd", name, "--ignore-not-found", "--wait=false")


def llmd(name: str, hub: HubServer, source: str = f"hf://{REPO}@main") -> dict[str, Any]:
    return {
        "apiVersion": "kvops.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {
                "source": source,
                "dtype": "float32",
                "endpoint": hub.url,
                "cache": {"claimName": CLAIM},
            },
            "gpus": 0,
            "engine": {"maxModelLen": 1024},
            # Three workers share the node: ask for little so that they all fit.
            "resources": {"requests": {"cpu": "100m", "memory": "1Gi"}},
        },
    }


def live_pods(kube, name: str) -> list[dict[str, Any]]:
    pods = kube.items("pods", f"kvops.io/llmdeployment={name}")
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def pull_result(pod: dict[str, Any]) -> dict[str, Any]:
    """The JSON line the pod's `model-pull` init container left as its termination message."""
    [pulled] = pod["status"]["initContainerStatuses"]
    assert pulled["name"] == "model-pull"
    return json.loads(pulled["state"]["terminated"]["message"])


def wait_ready_replicas(kube, name: str, count: int) -> dict[str, Any]:
    def ready():
        status = kube.status("llmd", name)
        ok = status.get("phase") == "Available" and status.get("readyReplicas") == count
        return status if ok else None

    return kube.wait(f"llmd/{name} Available with {count} ready", ready, WORKER_READY_S)


def served_bytes(hub: HubServer, name: str) -> int:
    return sum(s.bytes for s in hub.served(name) if s.method == "GET")


def answer(kube, name: str) -> str:
    with PortForward(kube, f"svc/{name}", 8000) as forward:
        client = openai.OpenAI(
            base_url=f"{forward.url}/v1", api_key="unused", max_retries=0, timeout=120
        )
        reply = client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": "What is a paged KV cache?"}],
            max_tokens=16,
            temperature=0,
        )
    return reply.choices[0].message.content or ""


def test_an_hf_model_is_pulled_once_pinned_and_shared(kube, hub):
    size = sum((hub.folder / name).stat().st_size for name in KEPT)

    # 1. One replica pulls the model in its init container, then serves it.
    kube.apply(llmd("hf-chat", hub))
    status = wait_ready_replicas(kube, "hf-chat", 1)
    cache = status["modelCache"]
    assert (cache["state"], cache["revision"]) == ("Ready", hub.commit)
    assert (cache["bytes"], cache["files"]) == (size, len(KEPT))
    assert cache["volume"] == f"persistentVolumeClaim/{CLAIM}"
    [first] = live_pods(kube, "hf-chat")
    result = pull_result(first)
    assert result["revision"] == hub.commit and result["downloaded"] == size
    assert served_bytes(hub, WEIGHTS) == (hub.folder / WEIGHTS).stat().st_size  # each byte once
    assert "README.md" not in {s.file for s in hub.served()}  # only what a model loads
    assert answer(kube, "hf-chat").strip()
    # The resolved commit is pinned for every pod created from now on, without a rollout.
    config = kube.get("configmap", "hf-chat-model")
    assert config["data"]["source"] == f"hf://{REPO}@{hub.commit}"

    # 2. A second replica loads the pinned commit from the shared cache: no request at all.
    hub.clear_log()
    kube("scale", "llmd", "hf-chat", "--replicas=2")
    wait_ready_replicas(kube, "hf-chat", 2)
    pods = live_pods(kube, "hf-chat")
    assert first["metadata"]["uid"] in {p["metadata"]["uid"] for p in pods}  # nothing rolled
    [second] = [p for p in pods if p["metadata"]["uid"] != first["metadata"]["uid"]]
    result = pull_result(second)
    assert result["source"] == f"hf://{REPO}@{hub.commit}" and result["downloaded"] == 0
    assert hub.served() == []

    # 3. A second LLMDeployment of the same revision resolves main and finds it complete.
    kube.apply(llmd("hf-chat-2", hub))
    status = wait_ready_replicas(kube, "hf-chat-2", 1)
    assert status["modelCache"]["revision"] == hub.commit
    [other] = live_pods(kube, "hf-chat-2")
    assert pull_result(other)["downloaded"] == 0
    assert [s for s in hub.served() if s.method == "GET"] == []  # not one file downloaded
    assert answer(kube, "hf-chat-2").strip()


def test_an_unknown_repository_says_why_within_a_minute(kube, hub):
    kube.apply(llmd("hf-missing", hub, source="hf://org/no-such-model"))

    def degraded():
        condition = kube.condition("llmd", "hf-missing", "Degraded")
        ok = condition and condition["status"] == "True"
        return condition if ok and condition["reason"] == "ModelPullFailed" else None

    condition = kube.wait("llmd/hf-missing Degraded (ModelPullFailed)", degraded, DIAGNOSIS_S)
    assert "kvops: error: unknown repository: org/no-such-model" in condition["message"]
    cache = kube.status("llmd", "hf-missing")["modelCache"]
    assert cache["state"] == "Failed" and "unknown repository" in cache["message"]
    # The worker never started: its startup probe is not what failed.
    [pod] = live_pods(kube, "hf-missing")
    assert all("running" not in c["state"] for c in pod["status"].get("containerStatuses", []))
