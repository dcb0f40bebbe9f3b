"""kvops_* metrics from a real engine's requests, request spans, and OTLP export to a receiver."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from otlp_receiver import OTLPReceiver
from prometheus_client.parser import text_string_to_metric_families

from kvops.worker.async_engine import AsyncLLMEngine
from kvops.worker.config import EngineConfig
from kvops.worker.engine import LLMEngine
from kvops.worker.request import SamplingParams
from kvops.worker.serve.telemetry import (
    METRIC_NAMES,
    PromptLabel,
    RequestTracer,
    ServingMetrics,
    configure_tracing,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
# Shared by two requests, so that the second one hits the prefix cache (2 full blocks of 16).
SHARED_PREFIX = list(range(100, 140))


def tiny_engine() -> LLMEngine:
    return LLMEngine(
        EngineConfig(model="dummy:tiny", num_kv_blocks=64, max_model_len=256, max_num_seqs=8)
    )


def fixed_length(max_tokens: int) -> SamplingParams:
    # Random weights may sample EOS at any step; ignoring it makes output lengths exact.
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def async_engine():
    engine = AsyncLLMEngine(tiny_engine())
    yield engine
    engine.shutdown()


def samples_by_name(body: bytes) -> dict[str, list]:
    """Samples keyed by their own name (the parser files counters under the name minus _total)."""
    samples = defaultdict(list)
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[sample.name].append(sample)
    return samples


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    """The sum over the samples of `name` whose labels include `labels`."""
    matching = [s for s in samples[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    assert matching, f"no {name} sample with {labels}"
    return sum(s.value for s in matching)


# ------------------------------------------------------------------------------------ metrics


def test_metrics_after_real_requests(async_engine):
    engine = async_engine
    metrics = ServingMetrics(engine.model_name, engine.stats)
    support = PromptLabel(name="support-bot", version="3")

    async def run_to_end(ids: list[int], max_tokens: int):
        async for output in engine.generate(
            prompt_token_ids=ids, sampling_params=fixed_length(max_tokens)
        ):
            last = output
        return last

    async def cancel_after_first_token():
        stream = engine.generate(prompt_token_ids=[5, 6, 7], sampling_params=fixed_length(50))
        async for output in stream:
            await stream.aclose()  # what a server does when its client disconnects
            return output

    async def main():
        first = await run_to_end(SHARED_PREFIX + [1, 2], 4)
        rest = await asyncio.gather(run_to_end(SHARED_PREFIX + [3], 6), run_to_end([9, 8, 7, 6], 3))
        cancelled = await cancel_after_first_token()
        # The abort reaches the engine thread asynchronously, and its final output is delivered
        # to this loop: keep it open until then. The gauges follow the engine's snapshot.
        deadline = time.monotonic() + 10
        while engine.stats().num_running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return [first, *rest], cancelled

    finished, cancelled = asyncio.run(main())
    for output in finished[:2]:
        metrics.record_finished(output)
    metrics.record_finished(finished[2], prompt=support)
    metrics.record_finished(cancelled, outcome="aborted")
    metrics.record_rejected("rejected")
    metrics.record_rejected("invalid", prompt=support)

    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    samples = samples_by_name(body)
    model = engine.model_name

    exposed = {name.removesuffix(s) for name in samples for s in ("_bucket", "_sum", "_count")}
    for name in METRIC_NAMES:
        assert name in exposed, f"{name} is not exposed"
    for sample_list in samples.values():
        for sample in sample_list:
            assert sample.labels["model"] == model

    assert value(samples, "kvops_requests_total", finish_reason="length", outcome="success") == 3
    assert value(samples, "kvops_requests_total", finish_reason="abort", outcome="aborted") == 1
    assert value(samples, "kvops_requests_total", finish_reason="", outcome="rejected") == 1
    assert (
        value(
            samples,
            "kvops_requests_total",
            outcome="invalid",
            prompt_name="support-bot",
            prompt_version="3",
        )
        == 1
    )
    assert value(samples, "kvops_requests_total", prompt_name="") == 4

    everything = [*finished, cancelled]
    assert [len(o.token_ids) for o in finished] == [4, 6, 3]
    assert value(samples, "kvops_generation_tokens_total") == sum(
        len(o.token_ids) for o in everything
    )
    assert value(samples, "kvops_prompt_tokens_total") == sum(
        len(o.prompt_token_ids) for o in everything
    )
    assert value(samples, "kvops_request_prompt_tokens_sum") == sum(
        len(o.prompt_token_ids) for o in everything
    )
    assert value(samples, "kvops_request_generation_tokens_count") == 4
    assert value(samples, "kvops_request_generation_tokens_sum", prompt_name="support-bot") == 3

    for histogram in ("kvops_time_to_first_token_seconds", "kvops_e2e_request_latency_seconds"):
        assert value(samples, f"{histogram}_count") == 4
        buckets = [s for s in samples[f"{histogram}_bucket"] if s.labels["prompt_name"] == ""]
        counts = [s.value for s in sorted(buckets, key=lambda s: float(s.labels["le"]))]
        assert counts == sorted(counts) and counts[-1] == 3  # cumulative; +Inf holds them all
    assert value(samples, "kvops_request_queue_time_seconds_count") == 4
    # Requests with more than one output token (the cancelled one has no finished time).
    assert value(samples, "kvops_time_per_output_token_seconds_count") == 3
    ttft = value(samples, "kvops_time_to_first_token_seconds_sum")
    e2e = value(samples, "kvops_e2e_request_latency_seconds_sum")
    assert 0 < ttft <= e2e < 60
    assert value(samples, "kvops_time_per_output_token_seconds_sum") > 0

    stats = engine.stats()
    assert value(samples, "kvops_num_requests_running") == 0
    assert value(samples, "kvops_num_requests_waiting") == 0
    assert 0 <= value(samples, "kvops_kv_cache_usage_ratio") <= 1
    assert value(samples, "kvops_preemptions_total") == stats.num_preemptions
    hits = value(samples, "kvops_prefix_cache_hits_total")
    assert hits == stats.prefix_cache_hits and hits >= 32  # the second request reused 2 blocks
    assert value(samples, "kvops_prefix_cache_queries_total") >= hits
    assert finished[1].num_cached_tokens >= 32


def test_engine_counters_are_read_at_scrape_time(async_engine):
    engine = async_engine
    metrics = ServingMetrics(engine.model_name, engine.stats)
    before = value(samples_by_name(metrics.exposition()[0]), "kvops_prefix_cache_queries_total")

    async def one():
        async for _ in engine.generate(prompt_token_ids=[3] * 20, sampling_params=fixed_length(1)):
            pass

    asyncio.run(one())
    after = value(samples_by_name(metrics.exposition()[0]), "kvops_prefix_cache_queries_total")
    assert after == engine.stats().prefix_cache_queries > before


def test_openmetrics_exposition_on_request(async_engine):
    metrics = ServingMetrics("m", async_engine.stats)
    body, content_type = metrics.exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_label_values_come_from_fixed_sets(async_engine):
    metrics = ServingMetrics("m", async_engine.stats)
    with pytest.raises(ValueError, match="outcome"):
        metrics.record_rejected("client went away")
    with pytest.raises(ValueError, match="success"):
        metrics.record_rejected("success")


# ------------------------------------------------------------------------------------ traces


@pytest.fixture(scope="module")
def finished_output():
    engine = tiny_engine()
    [output] = engine.generate(prompt_token_ids=[[4, 5, 6, 7]], sampling_params=fixed_length(5))
    return output


def in_memory_tracer() -> tuple[RequestTracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return RequestTracer(provider), exporter


@pytest.mark.parametrize(
    "carrier",
    [
        {"Traceparent": TRACEPARENT, "content-type": "application/json"},  # HTTP headers
        (("traceparent", TRACEPARENT), ("auth-bin", b"\x00\x01")),  # gRPC invocation metadata
    ],
    ids=["http-headers", "grpc-metadata"],
)
def test_request_span_continues_the_callers_trace(finished_output, carrier):
    tracer, exporter = in_memory_tracer()
    params = SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, seed=11, stop=["\n\n"])
    span = tracer.start_span("chat", "tiny", params, carrier, stream=True)
    tracer.finish_span(span, [finished_output], response_id="chatcmpl-123")

    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"chat tiny", "queue", "prefill", "decode"}
    server = spans["chat tiny"]
    assert server.kind is SpanKind.SERVER
    assert trace.format_trace_id(server.context.trace_id) == TRACE_ID
    assert trace.format_span_id(server.parent.span_id) == PARENT_SPAN_ID
    assert server.parent.is_remote
    output = finished_output
    assert dict(server.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "kvops",
        "gen_ai.request.model": "tiny",
        "gen_ai.request.max_tokens": 5,
        "gen_ai.request.temperature": 0.7,
        "gen_ai.request.top_p": 0.9,
        "gen_ai.request.seed": 11,
        "gen_ai.request.stop_sequences": ("\n\n",),
        "gen_ai.request.stream": True,
        "gen_ai.response.id": "chatcmpl-123",
        "gen_ai.response.finish_reasons": ("length",),
        "gen_ai.usage.input_tokens": 4,
        "gen_ai.usage.cache_read.input_tokens": output.num_cached_tokens,
        "gen_ai.usage.output_tokens": 5,
    }
    assert server.status.status_code is StatusCode.UNSET

    phases = [spans[name] for name in ("queue", "prefill", "decode")]
    for phase in phases:
        assert phase.parent.span_id == server.context.span_id
        assert phase.context.trace_id == server.context.trace_id
        assert phase.start_time <= phase.end_time
    for earlier, later in zip(phases, phases[1:], strict=False):
        assert earlier.end_time == later.start_time
    # Rebuilt from monotonic times, they must still sit on the wall clock near now.
    assert abs(phases[-1].end_time - time.time_ns()) < 60e9
    assert phases[-1].end_time - phases[0].start_time == pytest.approx(
        (output.finished_time - output.arrival_time) * 1e9, abs=1e4
    )


def test_error_span_and_unreached_phases():
    engine = tiny_engine()
    request = engine.add_request(prompt_token_ids=[1, 2, 3], sampling_params=fixed_length(4))
    aborted = engine.abort_request(request.request_id)  # aborted while still waiting
    tracer, exporter = in_memory_tracer()
    span = tracer.start_span("generate", "tiny", fixed_length(4), carrier=None)
    tracer.finish_span(span, [aborted], TimeoutError("deadline exceeded"))

    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"generate tiny", "queue"}
    server = spans["generate tiny"]
    assert server.parent is None  # no carrier: a new trace
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes["error.type"] == "TimeoutError"
    assert server.attributes["gen_ai.response.finish_reasons"] == ("abort",)
    assert server.attributes["gen_ai.usage.output_tokens"] == 0


def test_tracing_off_is_a_no_op(finished_output, monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert configure_tracing() is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert configure_tracing() is None

    tracer = RequestTracer(None)
    assert not tracer.enabled
    span = tracer.start_span("chat", "tiny", fixed_length(4), {"traceparent": TRACEPARENT})
    assert not span.is_recording()
    tracer.finish_span(span, [finished_output])  # nothing to do, nothing raised


def test_unsupported_exporter_settings_are_named(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER"):
        configure_tracing()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        configure_tracing()


@pytest.mark.parametrize(
    ("env", "service_name"),
    [
        ({}, "kvops-worker"),
        ({"OTEL_SERVICE_NAME": "from-env"}, "from-env"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs,k8s.pod.name=p"}, "from-attrs"),
    ],
)
def test_service_name_follows_the_environment(monkeypatch, env, service_name):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    for name, setting in env.items():
        monkeypatch.setenv(name, setting)
    provider = configure_tracing()
    try:
        assert provider.resource.attributes["service.name"] == service_name
    finally:
        provider.shutdown()


def test_otlp_export_reaches_a_receiver(finished_output, monkeypatch):
    with OTLPReceiver() as receiver:
        monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "worker-under-test")
        provider = configure_tracing()
        assert provider is not None
        try:
            tracer = RequestTracer(provider)
            span = tracer.start_span(
                "text_completion", "tiny", fixed_length(5), {"traceparent": TRACEPARENT}
            )
            tracer.finish_span(span, [finished_output])
            assert provider.force_flush(timeout_millis=10_000)
            spans = {s.name: s for s in receiver.wait_for_spans(4, timeout=10)}
        finally:
            provider.shutdown()

    server = spans["text_completion tiny"]
    assert server.resource["service.name"] == "worker-under-test"
    assert server.trace_id == TRACE_ID and server.parent_span_id == PARENT_SPAN_ID
    assert server.kind == 2  # SERVER
    assert server.attributes["gen_ai.operation.name"] == "text_completion"
    assert server.attributes["gen_ai.usage.output_tokens"] == 5
    assert server.attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert spans["decode"].parent_span_id == server.span_id
