"""A worker's edges: overload, API keys, gRPC over TLS, and draining on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serve_process import ServeProcess, engine_answer

from kvops.v1 import engine_pb2, engine_pb2_grpc

pytestmark = pytest.mark.slow

API_KEY = "kvops-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
HELLO = [{"role": "user", "content": "Say hello to Ada."}]


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"),
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return folder / "cert.pem", folder / "key.pem"


@pytest.fixture(scope="module")
def small_server(tls_files):
    """Two running requests and a queue of four; an API key; gRPC over TLS."""
    cert, key = tls_files
    args = ("--max-num-seqs", "2", "--max-queue", "4")
    tls = ("--grpc-tls-cert", str(cert), "--grpc-tls-key", str(key))
    with ServeProcess(*args, *tls, env={"KVOPS_API_KEY": API_KEY}) as server:
        yield server


def test_a_burst_beyond_the_queue_gets_429s_and_the_rest_correct_answers(
    small_server, served_engine
):
    expected = engine_answer(served_engine, HELLO, 24)
    body = {"messages": HELLO, "max_tokens": 24, "temperature": 0}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=small_server.base_url, timeout=300) as client:
            requests = [
                client.post("/v1/chat/completions", json=body, headers=AUTH) for _ in range(50)
            ]
            return await asyncio.gather(*requests)

    replies = asyncio.run(asyncio.wait_for(burst(), 300))
    ok = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code == 429]
    assert len(ok) + len(refused) == 50, [r.status_code for r in replies]
    # Two run and four wait; the burst arrives long before any of them finishes.
    assert 6 <= len(ok) <= 20
    assert all(r.json()["choices"][0]["message"]["content"] == expected for r in ok)
    for reply in refused:
        assert reply.headers["Retry-After"] == "1"
        assert reply.json()["error"]["type"] == "rate_limit_error"
    samples = httpx.get(f"{small_server.base_url}/metrics").text
    rejected = sum(
        float(line.rsplit(" ", 1)[1])
        for line in samples.splitlines()
        if line.startswith("kvops_requests_total{") and 'outcome="rejected"' in line
    )
    assert rejected == len(refused)


def test_the_api_key_is_required_and_never_logged(small_server, tls_files):
    url = f"{small_server.base_url}/v1/chat/completions"
    body = {"messages": HELLO, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        reply = httpx.post(url, json=body, headers=headers, timeout=60)
        assert reply.status_code == 401
        assert "API key" in reply.json()["error"]["message"]
    assert httpx.post(url, json=body, headers=AUTH, timeout=60).status_code == 200
    # Probes and scrapes need no key.
    assert httpx.get(f"{small_server.base_url}/ready").status_code == 200
    assert httpx.get(f"{small_server.base_url}/metrics").status_code == 200
    assert API_KEY not in small_server.tail(10_000)

    cert, _ = tls_files
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(small_server.grpc_target, credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        stub = engine_pb2_grpc.EngineStub(channel)
        request = engine_pb2.GenerateRequest(
            prompt="Hello", sampling=engine_pb2.SamplingParams(max_tokens=2)
        )
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Generate(request, timeout=30))
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        metadata = (("authorization", f"Bearer {API_KEY}"),)
        replies = list(stub.Generate(request, timeout=60, metadata=metadata))
        assert sum(len(r.token_ids) for r in replies) == 2

    # A plain-text client cannot talk to the TLS port.
    with grpc.insecure_channel(small_server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError):
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)


def test_sigterm_finishes_the_running_request_then_exits_0(served_engine):
    with ServeProcess("--shutdown-grace", "60") as server:
        body = {
            "messages": HELLO,
            "max_tokens": 48,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        url = f"{server.base_url}/v1/chat/completions"
        text, finish = "", None
        with httpx.Client(timeout=120) as http, http.stream("POST", url, json=body) as reply:
            lines = reply.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                if text:
                    break
            server.terminate()
            # Draining: not ready, and new work is refused, while the stream goes on.
            assert httpx.get(f"{server.base_url}/ready").status_code == 503
            refused = httpx.post(url, json={"messages": HELLO, "max_tokens": 2}, timeout=30)
            assert refused.status_code == 503
            for line in lines:
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["delta"].get("content", "")
                    finish = choice["finish_reason"] or finish
        assert finish == "length"
        assert text == engine_answer(served_engine, HELLO, 48, ignore_eos=True)
        assert server.wait(60) == 0


@pytest.mark.slow
def test_sigterm_while_the_model_loads_exits_at_once_even_as_pid_1():
    """In a pod the worker is PID 1, which the kernel spares every signal it has no handler for:
    a pod deleted during the model load must not wait out its grace period for SIGKILL. The
    worker runs here as PID 1 of a PID namespace of its own (unshare, as root)."""
    command = [
        "unshare", "--pid", "--fork", "--kill-child", "--",
        sys.executable, "-m", "kvops.worker.serve.cli", "serve", "--http-port", "0",
        "--grpc-port", "0",
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        child = None
        deadline = time.monotonic() + 60
        while child is None and time.monotonic() < deadline:
            # Once torch is mapped the worker is past its start-up and loading the model.
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
            if children and "libtorch" in Path(f"/proc/{children[0]}/maps").read_text():
                child = int(children[0])
            time.sleep(0.05)
        assert child is not None, "the worker never loaded torch"
        os.kill(child, signal.SIGTERM)
        assert process.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        process.kill()
        process.wait()
