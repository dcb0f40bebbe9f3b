"""RAG in the worker, with real parts: an index built by the real `kvops index build`, served by
the real `kvops index serve`, a real `kvops serve` (built-in SmolLM2) with --vector-index, the
`openai` client, the generated gRPC stubs and an OTLP receiver.

The module's servers are shared; the last test stops the index server (its failure mode).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import grpc
import httpx
import openai
import pytest
import torch
from otlp_receiver import OTLPReceiver
from serve_process import ServeProcess, index_serve_process, metric_sum, metrics
from starlette.testclient import TestClient
from test_serve_inprocess import FakeAsyncEngine, collect, generate_request, run_grpc, serving_state

from kvops.v1 import engine_pb2, engine_pb2_grpc
from kvops.worker.rag.embedding import MiniLMEmbedder
from kvops.worker.serve.http import create_app
from kvops.worker.serve.retrieval import Retrieval

FACT = "The Larkspur bridge opened in 1911 and is 412 metres long."
DOCUMENTS = {
    "larkspur.txt": f"{FACT} It crosses the river Wend in three steel arches.",
    "weather.txt": "Rainfall in the Wend valley peaks in November, at 140 millimetres on average.",
    "trains.txt": "The night train from Arvel to Dunmore takes nine hours and stops four times.",
    "bakery.txt": "The bakery on Mill Street sells rye bread on Tuesdays and Fridays only.",
}
QUESTION = "How long is the Larkspur bridge?"
PROMPT = {
    "prompts": {
        "grounded": {
            "labels": {"production": "1"},
            "versions": {
                "1": {
                    "promptVersion": "grounded-v1",
                    "version": "1",
                    "contentHash": "sha256:" + "1" * 64,
                    "template": [
                        {
                            "role": "system",
                            "content": "Answer from these notes only.\n\n{{ context }}",
                        },
                        {"role": "user", "content": "{{ question }}"},
                    ],
                    "variables": [
                        {"name": "context", "required": True},
                        {"name": "question", "required": True},
                    ],
                    "modelParameters": {"temperature": 0.0, "maxTokens": 40},
                }
            },
        }
    }
}


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    for name, text in DOCUMENTS.items():
        (corpus / name).write_text(text)
    output = tmp_path_factory.mktemp("index") / "v1"
    result = subprocess.run(
        [sys.executable, "-m", "kvops.worker.serve.cli", "index", "build", "--source",
         str(corpus), "--output", str(output), "--chunk-size", "64", "--chunk-overlap", "8"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return output


@pytest.fixture(scope="module")
def index_server(index):
    process = index_serve_process(index)
    with process:
        yield process


@pytest.fixture(scope="module")
def receiver():
    with OTLPReceiver() as started:
        yield started


@pytest.fixture(scope="module")
def worker(index_server, receiver, tmp_path_factory):
    prompts = tmp_path_factory.mktemp("prompts")
    (prompts / "prompts.json").write_text(json.dumps(PROMPT))
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    process = ServeProcess(
        "--vector-index", index_server.grpc_target, "--prompts-dir", str(prompts), env=env
    )
    with process:
        yield process


@pytest.fixture(scope="module")
def client(worker):
    return openai.OpenAI(base_url=f"{worker.base_url}/v1", api_key="unused", max_retries=0)


def ask(client, question: str = QUESTION, **extra):
    return client.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=40,
        extra_body=extra or None,
    )


@pytest.mark.slow
def test_a_rag_answer_cites_the_chunk_that_holds_the_fact(client, worker, receiver):
    response = ask(client)
    extra = response.model_extra
    answer = response.choices[0].message.content
    citations = extra["citations"]
    assert citations[0]["source"] == "larkspur.txt"
    assert citations[0]["chunk_id"] == "larkspur.txt#0"
    assert [c["index"] for c in citations] == [1, 2, 3, 4]  # the default top_k
    assert citations[0]["score"] > citations[1]["score"]
    # SmolLM2-135M copies the fact from its context (greedy): "... is approximately 412 metres
    # long." Without retrieval it does not know it.
    assert "412" in answer
    assert "412" not in ask(client, retrieval=False).choices[0].message.content
    # Its one sentence restates the chunk: fully grounded.
    assert extra["groundedness"] == {"score": 1.0, "ungrounded_sentences": []}

    samples = metrics(worker)
    assert metric_sum(samples, "kvops_retrieval_seconds_count") >= 1
    grounded = {"prompt_name": "", "prompt_version": ""}
    assert metric_sum(samples, "kvops_rag_groundedness_count", **grounded) >= 1
    assert metric_sum(samples, "kvops_rag_groundedness_bucket", le="0.9", **grounded) == 0

    spans = _spans_of(receiver, response.id)
    retrieval = spans["retrieval"]
    request = spans[f"chat {response.model}"]
    assert retrieval.parent_span_id == request.span_id
    assert retrieval.attributes["kvops.retrieval.index_address"] == worker_index_address(worker)
    assert retrieval.attributes["kvops.retrieval.top_k"] == 4
    assert retrieval.attributes["kvops.retrieval.hits"] == 4
    assert retrieval.attributes["kvops.rag.groundedness"] == 1.0
    # The request span covers retrieval; no span carries chunk text.
    assert request.start_time_unix_nano <= retrieval.start_time_unix_nano
    assert not any("Larkspur" in str(v) for s in spans.values() for v in s.attributes.values())


def worker_index_address(worker) -> str:
    flag = worker.args.index("--vector-index")
    return worker.args[flag + 1]


def _spans_of(receiver, response_id: str, timeout: float = 10) -> dict:
    """The spans of the trace whose request span has `response_id`, by name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spans = receiver.spans
        requests = [s for s in spans if s.attributes.get("gen_ai.response.id") == response_id]
        if requests:
            trace_id = requests[0].trace_id
            named = {s.name: s for s in spans if s.trace_id == trace_id}
            if "retrieval" in named:
                return named
        time.sleep(0.1)
    raise TimeoutError(f"no retrieval span for {response_id}")


@pytest.mark.slow
def test_streaming_carries_citations_first_and_groundedness_last(client):
    stream = client.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=40,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].model_extra["citations"][0]["chunk_id"] == "larkspur.txt#0"
    assert all("citations" not in c.model_extra for c in chunks[1:])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "412" in text
    assert chunks[-1].choices == []
    assert chunks[-1].model_extra["groundedness"]["score"] == 1.0


@pytest.mark.slow
def test_a_request_tunes_or_skips_retrieval(client):
    one = ask(client, retrieval={"top_k": 1})
    assert [c["chunk_id"] for c in one.model_extra["citations"]] == ["larkspur.txt#0"]
    filtered = ask(client, retrieval={"top_k": 2, "filters": {"source": "bakery.txt"}})
    assert {c["source"] for c in filtered.model_extra["citations"]} == {"bakery.txt"}
    skipped = ask(client, retrieval=False)
    assert "citations" not in skipped.model_extra and "groundedness" not in skipped.model_extra
    with pytest.raises(openai.BadRequestError, match="retrieval: .*top_k: Input should be"):
        ask(client, retrieval={"top_k": 0})
    with pytest.raises(openai.BadRequestError, match="retrieval: .*k: Extra inputs"):
        ask(client, retrieval={"k": 2})


@pytest.mark.slow
def test_a_managed_prompt_gets_the_chunks_in_its_context_variable(client, worker):
    response = client.chat.completions.create(
        model="", messages=[], extra_body={"prompt": {"name": "grounded", "variables": {
            "question": QUESTION}}},
    )  # fmt: skip
    assert response.model_extra["prompt"]["version"] == "1"
    assert response.model_extra["citations"][0]["source"] == "larkspur.txt"
    assert "412" in response.choices[0].message.content
    samples = metrics(worker)
    labels = {"prompt_name": "grounded", "prompt_version": "1"}
    assert metric_sum(samples, "kvops_rag_groundedness_count", **labels) == 1
    with pytest.raises(openai.BadRequestError, match="filled by retrieval"):
        client.chat.completions.create(
            model="", messages=[], extra_body={"prompt": {"name": "grounded", "variables": {
                "question": QUESTION, "context": "mine"}}},
        )  # fmt: skip


@pytest.mark.slow
def test_an_answer_from_outside_the_corpus_counts_as_ungrounded(client, worker):
    before = metric_sum(metrics(worker), "kvops_rag_ungrounded_answers_total")
    response = ask(client, "Write two sentences about the history of the Roman Empire.")
    grounded = response.model_extra["groundedness"]
    assert grounded["score"] < 0.5 and grounded["ungrounded_sentences"]
    after = metric_sum(metrics(worker), "kvops_rag_ungrounded_answers_total")
    assert after == before + 1


@pytest.mark.slow
def test_openai_embeddings_are_minilm(client):
    texts = ["a bridge over a river", "rye bread on Tuesdays"]
    response = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
    got = torch.tensor([item.embedding for item in response.data])
    expected = MiniLMEmbedder().embed(texts)
    assert got.shape == (2, 384) and torch.allclose(got, expected, atol=1e-5)
    assert response.usage.prompt_tokens > 4
    floats = client.embeddings.create(model="all-MiniLM-L6-v2", input="x", encoding_format="float")
    assert len(floats.data[0].embedding) == 384
    with pytest.raises(openai.NotFoundError, match="all-MiniLM-L6-v2"):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.BadRequestError, match="input"):
        client.embeddings.create(model="all-MiniLM-L6-v2", input=[])


@pytest.mark.slow
def test_search_over_http_and_grpc_and_embed_over_grpc(worker):
    found = httpx.post(f"{worker.base_url}/v1/search", json={"query": QUESTION, "top_k": 2})
    assert found.status_code == 200
    hits = found.json()["hits"]
    assert len(hits) == 2 and hits[0]["chunk_id"] == "larkspur.txt#0" and FACT in hits[0]["text"]
    bad = httpx.post(f"{worker.base_url}/v1/search", json={"query": ""})
    assert bad.status_code == 400 and "query" in bad.json()["error"]["message"]
    with grpc.insecure_channel(worker.grpc_target) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        response = stub.Search(engine_pb2.SearchRequest(query=QUESTION, top_k=1), timeout=30)
        assert [h.chunk_id for h in response.hits] == ["larkspur.txt#0"]
        assert response.hits[0].source == response.hits[0].document_id == "larkspur.txt"
        embedded = stub.Embed(engine_pb2.EmbedRequest(inputs=["a", "b c"]), timeout=30)
        assert [len(e.values) for e in embedded.embeddings] == [384, 384]
        with pytest.raises(grpc.RpcError) as refused:
            stub.Embed(engine_pb2.EmbedRequest(inputs=["a"], model="other"), timeout=30)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def generate(stub, max_tokens: int = 40, **fields) -> list[engine_pb2.GenerateResponse]:
    """One Generate stream, collected; the input is the question as chat unless `fields` give
    another."""
    if not {"prompt", "prompt_token_ids", "chat", "prompt_reference"} & fields.keys():
        question = engine_pb2.ChatMessage(role="user", content=QUESTION)
        fields["chat"] = engine_pb2.ChatMessages(messages=[question])
    sampling = engine_pb2.SamplingParams(temperature=0, max_tokens=max_tokens)
    request = engine_pb2.GenerateRequest(sampling=sampling, **fields)
    return list(stub.Generate(request, timeout=120))


@pytest.mark.slow
def test_grpc_generate_cites_on_the_first_message_and_scores_on_the_last(worker, receiver):
    unlabelled = {"prompt_name": "", "prompt_version": ""}
    scored = metric_sum(metrics(worker), "kvops_rag_groundedness_count", **unlabelled)
    with grpc.insecure_channel(worker.grpc_target) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        responses = generate(stub)
        first, last = responses[0], responses[-1]
        citations = first.citations
        assert citations[0].chunk_id == "larkspur.txt#0" and citations[0].source == "larkspur.txt"
        assert [c.index for c in citations] == [1, 2, 3, 4]
        assert citations[0].score > citations[1].score
        assert not any(r.citations for r in responses[1:])
        # The same greedy answer as over HTTP: the fact, copied from the chunk.
        assert "412" in "".join(r.text for r in responses)
        assert last.finish_reason and last.HasField("groundedness")
        assert last.groundedness.score == 1.0 and not last.groundedness.ungrounded_sentences
        assert not any(r.HasField("groundedness") for r in responses[:-1])
        samples = metrics(worker)
        assert metric_sum(samples, "kvops_rag_groundedness_count", **unlabelled) == scored + 1
        spans = _spans_of(receiver, first.request_id)
        request = next(
            s for s in spans.values() if s.attributes.get("gen_ai.response.id") == first.request_id
        )
        assert request.attributes["gen_ai.operation.name"] == "generate"
        assert spans["retrieval"].parent_span_id == request.span_id
        assert spans["retrieval"].attributes["kvops.rag.groundedness"] == 1.0

        skipped = generate(stub, retrieval=engine_pb2.RetrievalOptions(disabled=True))
        assert not any(r.citations or r.HasField("groundedness") for r in skipped)
        assert "412" not in "".join(r.text for r in skipped)

        one = generate(stub, 4, retrieval=engine_pb2.RetrievalOptions(top_k=1))
        assert [c.chunk_id for c in one[0].citations] == ["larkspur.txt#0"]
        bakery = engine_pb2.RetrievalOptions(top_k=2, filters={"source": "bakery.txt"})
        filtered = generate(stub, 4, retrieval=bakery)
        assert {c.source for c in filtered[0].citations} == {"bakery.txt"}

        reference = engine_pb2.PromptReference(name="grounded", variables={"question": QUESTION})
        managed = generate(stub, 8, prompt_reference=reference)
        assert managed[0].prompt_used.version == "1"
        assert managed[0].citations[0].chunk_id == "larkspur.txt#0"
        assert managed[-1].HasField("groundedness")

        # A raw prompt is the client's own: no retrieval, unless asked for, which is refused.
        raw = generate(stub, 2, prompt="The bridge")
        assert not any(r.citations or r.HasField("groundedness") for r in raw)
        refusals = [
            ({"prompt": "The bridge", "retrieval": engine_pb2.RetrievalOptions()}, "not prompt"),
            ({"retrieval": engine_pb2.RetrievalOptions(top_k=101)}, "retrieval.top_k"),
            ({"retrieval": engine_pb2.RetrievalOptions(disabled=True, top_k=2)}, "disabled"),
        ]
        for fields, message in refusals:
            with pytest.raises(grpc.RpcError) as refused:
                generate(stub, 2, **fields)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in refused.value.details()


def test_without_a_vector_index_search_is_not_found_and_retrieval_refused():
    state = serving_state(FakeAsyncEngine())
    with TestClient(create_app(state)) as client:
        search = client.post("/v1/search", json={"query": "anything"})
        assert search.status_code == 404
        assert "no vector index is configured" in search.json()["error"]["message"]
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        refused = client.post("/v1/chat/completions", json={**chat, "retrieval": {"top_k": 2}})
        assert refused.status_code == 400 and "no vector index" in refused.text
        answered = client.post("/v1/chat/completions", json=chat).json()
        assert "citations" not in answered and "groundedness" not in answered
    hi = engine_pb2.ChatMessages(messages=[engine_pb2.ChatMessage(role="user", content="hi")])

    async def over_grpc(stub):
        plain = await collect(stub, generate_request(prompt=None, chat=hi))
        assert not any(r.citations or r.HasField("groundedness") for r in plain)
        asked = generate_request(prompt=None, chat=hi, retrieval=engine_pb2.RetrievalOptions())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await collect(stub, asked)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no vector index" in (refused.value.details() or "")

    run_grpc(serving_state(FakeAsyncEngine()), over_grpc)
    with pytest.raises(ValueError, match="top_k"):
        Retrieval(serving_state(FakeAsyncEngine(), vector_index="127.0.0.1:1", retrieval_top_k=0))


@pytest.mark.slow
def test_zz_with_the_index_server_stopped_requests_fail_clearly(client, worker, index_server):
    """Last in the module: it stops the shared index server."""
    index_server.stop()
    address = worker_index_address(worker)
    before = metric_sum(metrics(worker), "kvops_retrieval_errors_total")
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as failed:
        ask(client)
    assert time.monotonic() - started < 10  # the search deadline is 5 s: never a hang
    assert failed.value.status_code == 503
    assert address in failed.value.message and "vector index" in failed.value.message
    search = httpx.post(f"{worker.base_url}/v1/search", json={"query": QUESTION})
    assert search.status_code == 503 and address in search.json()["error"]["message"]
    with grpc.insecure_channel(worker.grpc_target) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        with pytest.raises(grpc.RpcError) as unavailable:
            generate(stub)
        assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
        assert address in unavailable.value.details()
        # The explicit off switch still answers.
        assert generate(stub, 2, retrieval=engine_pb2.RetrievalOptions(disabled=True))
    samples = metrics(worker)
    assert metric_sum(samples, "kvops_retrieval_errors_total") == before + 3
    assert metric_sum(samples, "kvops_requests_total", outcome="error") >= 1
    # Without retrieval the worker still answers.
    assert ask(client, retrieval=False).choices[0].message.content
