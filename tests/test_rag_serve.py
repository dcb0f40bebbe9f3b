"""`kvops index build|search|serve` through the real CLI (subprocesses) and the real servers:
HTTP with httpx and the `openai` client, gRPC with the generated stubs and SearchClient."""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import shutil
import signal
import subprocess
import sys

import grpc
import httpx
import openai
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serve_process import free_port, index_serve_process, metric_sum, metrics

from kvops.v1 import engine_pb2, engine_pb2_grpc
from kvops.worker.rag.client import SearchClient, SearchUnavailable
from kvops.worker.rag.embedding import MiniLMEmbedder

FUNCTIONS = [shutil.copytree, shutil.rmtree, shutil.which, shutil.move, json.dumps, json.loads]


def kvops(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvops.worker.serve.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """One file per function, its docstring read here; a hidden ConfigMap-style entry that
    must be skipped."""
    folder = tmp_path_factory.mktemp("corpus")
    for function in FUNCTIONS:
        name = f"{function.__module__}.{function.__name__}"
        (folder / f"{name}.txt").write_text(f"{name}\n\n{inspect.getdoc(function)}")
    (folder / "..data").mkdir()
    (folder / "..data" / "stale.txt").write_text("never indexed")
    return folder


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    output = tmp_path_factory.mktemp("index") / "v1"
    log = output.parent / "termination-log"
    log.write_text("")
    result = kvops(
        "index",
        "build",
        "--source",
        str(corpus),
        "--output",
        str(output),
        "--chunk-size",
        "128",
        "--chunk-overlap",
        "16",
        "--termination-log",
        str(log),
    )
    assert result.returncode == 0, result.stderr
    return output, result, log


@pytest.mark.slow
def test_build_writes_the_index_and_reports_it(built):
    output, result, log = built
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["documents"] == len(FUNCTIONS) and report["dimension"] == 384
    assert report["chunks"] >= len(FUNCTIONS) and report["seconds"] > 0
    assert json.loads(log.read_text()) == report  # what the operator reads from the pod
    assert sorted(p.name for p in output.iterdir()) == [
        "chunks.jsonl",
        "manifest.json",
        "vectors.safetensors",
    ]
    sources = {json.loads(line)["source"] for line in (output / "chunks.jsonl").open()}
    assert sources == {f"{f.__module__}.{f.__name__}.txt" for f in FUNCTIONS}


@pytest.mark.slow
def test_search_prints_the_top_hits(built):
    output, _, _ = built
    result = kvops("index", "search", str(output), "recursively copy a directory tree", "--json")
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)
    assert len(hits) == 3 and hits[0]["source"] == "shutil.copytree.txt"
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    text = kvops("index", "search", str(output), "find an executable on the PATH", "--top-k", "1")
    assert text.returncode == 0 and "1. " in text.stdout and "shutil.which.txt#0" in text.stdout
    filtered = kvops(
        "index", "search", str(output), "copy a tree", "--filter", "source=json.dumps.txt", "--json"
    )
    assert {hit["source"] for hit in json.loads(filtered.stdout)} == {"json.dumps.txt"}


@pytest.mark.slow
def test_build_errors_are_clear_and_reach_the_termination_log(tmp_path):
    log = tmp_path / "termination-log"
    log.write_text("")
    result = kvops(
        "index",
        "build",
        "--source",
        str(tmp_path / "missing"),
        "--output",
        str(tmp_path / "out"),
        "--termination-log",
        str(log),
    )
    assert result.returncode == 2 and "missing: no such file or folder" in result.stderr
    assert "no such file or folder" in json.loads(log.read_text())["error"]
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    result = kvops(
        "index", "build", "--source", str(tmp_path / "empty"), "--output", str(tmp_path / "o")
    )
    assert result.returncode == 2 and "no text to index" in result.stderr
    result = kvops("index", "search", str(tmp_path), "query")
    assert result.returncode == 2 and "not a vector index" in result.stderr


@pytest.fixture(scope="module")
def server(built):
    output, _, _ = built
    process = index_serve_process(output)
    with process:
        yield process


@pytest.mark.slow
def test_http_search_and_errors(server):
    response = httpx.post(
        f"{server.base_url}/v1/search",
        json={"query": "recursively copy a directory tree", "top_k": 2},
    )
    assert response.status_code == 200
    hits = response.json()["hits"]
    assert len(hits) == 2 and hits[0]["source"] == "shutil.copytree.txt"
    assert set(hits[0]) == {"chunk_id", "source", "text", "score", "metadata"}
    assert hits[0]["metadata"] == {"type": "txt"}
    filtered = httpx.post(
        f"{server.base_url}/v1/search",
        json={"query": "copy", "filters": {"source": "json.loads.txt"}},
    ).json()["hits"]
    assert {hit["source"] for hit in filtered} == {"json.loads.txt"}
    for body, message in [
        ({"top_k": 2}, "query must be a string"),
        ({"query": "x", "top_k": 0}, "top_k must be between"),
        ({"query": " "}, "query must not be empty"),
    ]:
        bad = httpx.post(f"{server.base_url}/v1/search", json=body)
        assert bad.status_code == 400 and message in bad.json()["error"]["message"]
    bad = httpx.post(f"{server.base_url}/v1/search", content=b"{")
    assert bad.status_code == 400 and "not JSON" in bad.json()["error"]["message"]
    ready = httpx.get(f"{server.base_url}/ready").json()
    assert ready["status"] == "ready" and ready["dimension"] == 384
    samples = metrics(server)
    assert metric_sum(samples, "kvops_index_requests_total", operation="search", outcome="ok") >= 2
    assert metric_sum(samples, "kvops_index_requests_total", outcome="invalid") >= 3


@pytest.mark.slow
def test_openai_embeddings_match_the_library(server):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    texts = ["recursively copy a directory tree", "hello"]
    expected = MiniLMEmbedder().embed(texts)
    # Unless told otherwise the client asks for base64 and decodes it itself.
    for options in ({}, {"encoding_format": "float"}):
        answer = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts, **options)
        got = torch.tensor([item.embedding for item in answer.data])
        assert torch.allclose(got, expected, atol=1e-5)
        assert answer.usage.prompt_tokens > 0
    raw = client.embeddings.create(
        model="all-MiniLM-L6-v2", input="hello", encoding_format="base64"
    )
    decoded = torch.frombuffer(
        bytearray(base64.b64decode(raw.data[0].embedding)), dtype=torch.float32
    )
    assert torch.allclose(decoded, expected[1], atol=1e-5)
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert [m.id for m in client.models.list()] == ["all-MiniLM-L6-v2"]


@pytest.mark.slow
def test_grpc_search_embed_and_health(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        response = stub.Search(
            engine_pb2.SearchRequest(query="recursively copy a directory tree", top_k=2),
            timeout=30,
        )
        [first, _] = response.hits
        assert first.source == first.document_id == "shutil.copytree.txt"
        assert first.chunk_id.startswith("shutil.copytree.txt#") and first.metadata["type"] == "txt"
        embedded = stub.Embed(engine_pb2.EmbedRequest(inputs=["a", "b"]), timeout=30)
        assert [len(e.values) for e in embedded.embeddings] == [384, 384]
        with pytest.raises(grpc.RpcError) as error:
            stub.Search(engine_pb2.SearchRequest(query="x", top_k=5000), timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(engine_pb2.GenerateRequest(prompt="hi"), timeout=30).next()
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.slow
def test_search_client_sync_and_async(server):
    client = SearchClient(server.grpc_target)
    hits = client.search("find an executable program", 1)
    assert hits[0]["source"] == "shutil.which.txt" and set(hits[0]) == {
        "chunk_id",
        "source",
        "text",
        "score",
        "metadata",
    }
    filtered = client.search("copy", 3, {"source": "json.dumps.txt"})
    assert {hit["source"] for hit in filtered} == {"json.dumps.txt"}
    with pytest.raises(ValueError, match="top_k"):
        client.search("x", 5000)

    async def search_async():
        try:
            return await client.search_async("delete a directory tree", 1)
        finally:
            await client.close_async()

    assert asyncio.run(search_async())[0]["source"] == "shutil.rmtree.txt"


def test_search_client_errors():
    with pytest.raises(ValueError, match="host:port"):
        SearchClient("no-port")
    client = SearchClient(f"127.0.0.1:{free_port()}", timeout=3)
    with pytest.raises(SearchUnavailable, match="unreachable"):
        client.search("anything", 3)
    client.close()


@pytest.mark.slow
def test_sigterm_stops_the_server(built):
    output, _, _ = built
    process = index_serve_process(output)
    with process:
        process.process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


@pytest.mark.slow
def test_serving_a_missing_index_exits_with_the_reason(tmp_path):
    result = kvops(
        "index",
        "serve",
        "--index",
        str(tmp_path),
        "--http-port",
        str(free_port()),
        "--grpc-port",
        str(free_port()),
        "--host",
        "127.0.0.1",
        timeout=120,
    )
    assert result.returncode == 2 and "not a vector index" in result.stderr
