"""The gRPC API of a real `kvops serve`, through the generated stubs."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serve_process import metric_sum, wait_until_idle

from kvops.v1 import engine_pb2, engine_pb2_grpc
from kvops.worker.request import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def channel(default_server):
    with grpc.insecure_channel(default_server.grpc_target) as channel:
        yield channel


def test_generate_streams_the_engines_greedy_tokens(channel, served_engine):
    prompt = "The three primary colours are"
    [expected] = served_engine.generate(
        [prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    )
    stub = engine_pb2_grpc.EngineStub(channel)
    request = engine_pb2.GenerateRequest(
        prompt=prompt,
        sampling=engine_pb2.SamplingParams(max_tokens=16, ignore_eos=True, logprobs=1),
    )
    responses = list(stub.Generate(request, timeout=120))
    assert len(responses) > 1, "tokens must stream, not arrive at once"
    assert [t for r in responses for t in r.token_ids] == expected.token_ids
    assert "".join(r.text for r in responses) == expected.text
    assert all(len(lp.top) == 1 for r in responses for lp in r.logprobs)
    assert [r.finish_reason for r in responses[:-1]] == [""] * (len(responses) - 1)
    last = responses[-1]
    assert last.finish_reason == "length"
    assert last.usage.completion_tokens == 16
    assert last.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_chat_tokenize_and_list_models(channel, served_engine):
    stub = engine_pb2_grpc.EngineStub(channel)
    [model] = stub.ListModels(engine_pb2.ListModelsRequest()).models
    assert model.id == served_engine.model_name
    assert model.max_model_len == served_engine.max_model_len

    tokens = stub.Tokenize(engine_pb2.TokenizeRequest(text="Hello world"))
    assert list(tokens.token_ids) == served_engine.tokenizer.encode("Hello world")

    chat = engine_pb2.ChatMessages(messages=[engine_pb2.ChatMessage(role="user", content="Hi!")])
    sampling = engine_pb2.SamplingParams(max_tokens=8)
    request = engine_pb2.GenerateRequest(chat=chat, sampling=sampling)
    responses = list(stub.Generate(request, timeout=120))
    assert responses[-1].finish_reason in ("stop", "length")
    assert "".join(r.text for r in responses)


@pytest.mark.parametrize(
    ("request_fields", "code", "names"),
    [
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"prompt": "hi", "model": "gpt-9"}, grpc.StatusCode.NOT_FOUND, "gpt-9"),
        (
            {"prompt": "hi", "sampling": engine_pb2.SamplingParams(temperature=-1)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        (
            {"prompt": "hi", "sampling": engine_pb2.SamplingParams(max_tokens=-3)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_tokens",
        ),
        (
            {"prompt": "word " * 9000},
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_model_len",
        ),
    ],
    ids=["no-input", "unknown-model", "negative-temperature", "negative-max-tokens", "too-long"],
)
def test_bad_requests_get_a_status_naming_the_field(channel, request_fields, code, names):
    stub = engine_pb2_grpc.EngineStub(channel)
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(engine_pb2.GenerateRequest(**request_fields), timeout=60))
    assert raised.value.code() == code
    assert names in raised.value.details()


def test_cancel_mid_stream_aborts_and_frees_the_cache(default_server, channel):
    before = wait_until_idle(default_server)
    stub = engine_pb2_grpc.EngineStub(channel)
    request = engine_pb2.GenerateRequest(
        prompt="Once upon a time",
        sampling=engine_pb2.SamplingParams(max_tokens=400, ignore_eos=True),
    )
    call = stub.Generate(request, timeout=120)
    for _ in range(3):
        next(call)
    call.cancel()
    after = wait_until_idle(default_server)
    assert metric_sum(after, "kvops_kv_cache_usage_ratio") == 0
    assert metric_sum(after, "kvops_requests_total", outcome="aborted") == (
        metric_sum(before, "kvops_requests_total", outcome="aborted") + 1
    )


def test_a_short_deadline_ends_the_request(default_server, channel):
    stub = engine_pb2_grpc.EngineStub(channel)
    request = engine_pb2.GenerateRequest(
        prompt="Once upon a time",
        sampling=engine_pb2.SamplingParams(max_tokens=400, ignore_eos=True),
    )
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(request, timeout=1.0))
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 10
    assert metric_sum(wait_until_idle(default_server), "kvops_kv_cache_usage_ratio") == 0


def test_health_serves_and_reflection_lists_the_service(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "kvops.v1.Engine"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    [answer] = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    services = {s.name for s in answer.list_services_response.service}
    assert {"kvops.v1.Engine", "grpc.health.v1.Health"} <= services

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    [answer] = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="kvops.v1.Engine")]),
        timeout=10,
    )
    assert answer.file_descriptor_response.file_descriptor_proto
