"""RAG on a real node: a VectorIndex over a ConfigMap of documents builds with a real Job pod, its
search pod answers, and an LLMDeployment that references it (`spec.retrieval`) answers a question
from those documents through its Service, citing the document that holds the fact. The worker
reaches the search Service by its cluster DNS name, as the operator wires it."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import openai
from conftest import NAMESPACE, PortForward
from kube_helpers import wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_real_pods import WORKER_READY_S, example, ready_pod, worker_pods

INDEX = "town-notes"
LLMD = "town-guide"
FACT = "The Larkspur bridge opened in 1911 and is 412 metres long."
DOCUMENTS = {  # ConfigMap keys are the files the build reads, and the citations' sources
    "larkspur.txt": f"{FACT} It crosses the river Wend in three steel arches.",
    "weather.txt": "Rainfall in the Wend valley peaks in November, at 140 millimetres on average.",
    "trains.txt": "The night train from Arvel to Dunmore takes nine hours and stops four times.",
    "bakery.txt": "The bakery on Mill Street sells rye bread on Tuesdays and Fridays only.",
}
QUESTION = "How long is the Larkspur bridge?"
TOP_K = 2
# Start the build image, load MiniLM, embed; then the search pod, on a loaded 2-core VM.
INDEX_READY_S = 300


def documents() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": INDEX},
        "data": DOCUMENTS,
    }


def vector_index() -> dict[str, Any]:
    return {
        "apiVersion": "kvops.io/v1alpha1",
        "kind": "VectorIndex",
        "metadata": {"name": INDEX},
        "spec": {
            "source": {"configMap": {"name": INDEX}},
            "chunking": {"size": 64, "overlap": 8},  # each document is one chunk
            "storage": {"size": "64Mi"},
        },
    }


def rag_deployment() -> dict[str, Any]:
    """The example on the CPU, without its managed prompt (the default RAG system message)."""
    obj = example(LLMD)
    obj["spec"].pop("prompts")
    obj["spec"]["resources"] = {"requests": {"cpu": "100m", "memory": "512Mi"}}
    obj["spec"]["retrieval"] = {"vectorIndex": INDEX, "topK": TOP_K}
    return obj


def pods_report(kube) -> str:
    """Every pod of this test: phase, container states and the log's tail (a failed wait's
    diagnostics)."""
    lines = [kube.diagnostics()]
    for selector in (f"kvops.io/vectorindex={INDEX}", f"kvops.io/llmdeployment={LLMD}"):
        for pod in kube.items("pods", selector):
            name = pod["metadata"]["name"]
            statuses = pod["status"].get("containerStatuses") or []
            states = {c["name"]: c.get("state") for c in statuses}
            lines.append(f"pod {name}: {pod['status'].get('phase')} {json.dumps(states)}")
            try:
                lines.append(kube("logs", name, "--all-containers", "--tail=20"))
            except Exception as error:  # a diagnostic: never hide the real failure
                lines.append(f"(no log: {error})")
    return "\n".join(lines)


def wait(kube, what: str, check, timeout: float) -> Any:
    return wait_for(what, check, timeout, interval=1, diagnostics=lambda: pods_report(kube))


def post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def metric_sum(text: str, name: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def test_an_llmdeployment_answers_from_a_config_map_index_with_a_citation(kube):
    kube.apply(documents())
    kube.apply(vector_index())
    kube.apply(rag_deployment())  # starts alongside the build: the index is only asked per request
    try:
        ask_through_the_cluster(kube)
    finally:
        kube("delete", "llmd", LLMD, "--ignore-not-found", "--wait=false")
        kube("delete", "vidx", INDEX, "--ignore-not-found", "--wait=false")
        kube("delete", "configmap", INDEX, "--ignore-not-found", "--wait=false")


def ask_through_the_cluster(kube) -> None:
    def index_ready():
        status = kube.status("vidx", INDEX)
        return status if status.get("phase") == "Ready" else None

    status = wait(kube, f"vidx/{INDEX} Ready", index_ready, INDEX_READY_S)
    assert status["servedBuild"] == status["buildHash"]
    # Figures the build pod wrote to its termination message (the operator then drops the Job):
    # a real pod read the mounted ConfigMap, one chunk per document, and embedded it.
    figures = (status["documents"], status["chunks"], status["dimension"])
    assert figures == (len(DOCUMENTS), len(DOCUMENTS), 384), status
    assert status["buildDurationSeconds"] > 0
    with PortForward(kube, f"service/{INDEX}-search", 8000) as forward:
        [hit] = post_json(f"{forward.url}/v1/search", {"query": QUESTION, "top_k": 1})["hits"]
    assert hit["source"] == "larkspur.txt"

    def available():
        phase = kube.status("llmd", LLMD).get("phase")
        return phase == "Available" and ready_pod(kube, LLMD)

    pod = wait(kube, f"llmd/{LLMD} Available", available, WORKER_READY_S)
    assert pod["spec"]["nodeName"] == "kvops-node-0"
    env = {var["name"]: var.get("value") for var in pod["spec"]["containers"][0]["env"]}
    address = f"{INDEX}-search.{NAMESPACE}.svc:50051"  # a Service name: cluster DNS resolves it
    assert (env["KVOPS_VECTOR_INDEX_ADDRESS"], env["KVOPS_RETRIEVAL_TOP_K"]) == (address, "2")
    assert len(worker_pods(kube, LLMD)) == 1

    with PortForward(kube, f"svc/{LLMD}", 8000) as forward:
        client = openai.OpenAI(
            base_url=f"{forward.url}/v1", api_key="unused", max_retries=0, timeout=120
        )
        reply = client.chat.completions.create(
            model=LLMD,
            messages=[{"role": "user", "content": QUESTION}],
            temperature=0,
            max_tokens=40,
        )
        with urllib.request.urlopen(f"{forward.url}/metrics", timeout=30) as response:
            metrics = response.read().decode()
    answer = reply.choices[0].message.content
    citations = reply.model_extra["citations"]
    assert [c["source"] for c in citations][:1] == ["larkspur.txt"], (answer, citations)
    assert [c["index"] for c in citations] == list(range(1, TOP_K + 1))  # the spec's topK
    assert citations[0]["chunk_id"] == "larkspur.txt#0"
    assert citations[0]["score"] > citations[1]["score"]
    # SmolLM2-135M copies the fact from the retrieved chunk (greedy): "The Larkspur bridge is
    # approximately 412 metres long." One sentence, restating the chunk: fully grounded.
    assert "412" in answer, answer
    assert reply.model_extra["groundedness"]["score"] == 1.0, (answer, reply.model_extra)
    assert metric_sum(metrics, "kvops_retrieval_seconds_count") >= 1
