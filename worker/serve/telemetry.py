"""Prometheus metrics (kvops_*) and OpenTelemetry request traces for the worker servers.

Metrics: one ServingMetrics per server process, on its own CollectorRegistry. Per-request
histograms and counters are recorded when a request ends; the engine's gauges and its own
monotonic counters (preemptions, prefix-cache queries/hits) are read from an EngineStats snapshot
at scrape time, so nothing is counted twice.

Traces: off unless the standard OTEL_* variables configure an exporter. One SERVER span per
request, named "{operation} {model}", with the GenAI semantic conventions' attributes, and
"queue" / "prefill" / "decode" children rebuilt after the fact from the engine's timestamps.
Neither metrics nor spans ever carry prompt text, request ids as labels, or credentials.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.trace import Span, SpanContext, SpanKind, Status, StatusCode
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from kvops.worker.request import (
    EngineStats,
    RequestOutput,
    SamplingParams,
    resident_memory_bytes,
)

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------ metrics

# Every metric family this module exposes (histograms add _bucket/_sum/_count). Tests check
# that /metrics serves each, and that the metrics the operator's autoscaling reads are here.
METRIC_NAMES = (
    "kvops_time_to_first_token_seconds",
    "kvops_time_per_output_token_seconds",
    "kvops_e2e_request_latency_seconds",
    "kvops_request_queue_time_seconds",
    "kvops_request_prompt_tokens",
    "kvops_request_generation_tokens",
    "kvops_prompt_tokens_total",
    "kvops_generation_tokens_total",
    "kvops_requests_total",
    "kvops_preemptions_total",
    "kvops_prefix_cache_queries_total",
    "kvops_prefix_cache_hits_total",
    "kvops_num_requests_running",
    "kvops_num_requests_waiting",
    "kvops_kv_cache_usage_ratio",
)
# Served once the first feedback arrives (they have no sample before).
FEEDBACK_METRIC_NAMES = ("kvops_feedback_total", "kvops_feedback_score")
# Served once the first retrieval (RAG answer, failed search) happens.
RAG_METRIC_NAMES = (
    "kvops_retrieval_seconds",
    "kvops_retrieval_errors_total",
    "kvops_rag_groundedness",
    "kvops_rag_ungrounded_answers_total",
)

# Label values come from these fixed sets only, so that cardinality stays bounded.
OUTCOMES = ("success", "invalid", "rejected", "aborted", "timeout", "error")
# "" is a request that never reached the engine (rejected or invalid).
FINISH_REASONS = ("stop", "length", "abort", "")

# Buckets in seconds: the OpenTelemetry GenAI server buckets merged with vLLM's, so that
# dashboards built for either keep working.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
# vLLM starts at 0.01; small models on a GPU decode faster than that.
TPOT_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
    5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_GENAI_DURATION_BUCKETS = tuple(0.01 * 2**i for i in range(14))  # 0.01 ... 81.92, doubling
_VLLM_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
LATENCY_BUCKETS = tuple(
    sorted({round(b, 6) for b in _GENAI_DURATION_BUCKETS + _VLLM_LATENCY_BUCKETS})
)
# Token counts: 1, 2, 5, 10, ... 200000 (beyond the longest context a worker serves).
TOKEN_BUCKETS = tuple(m * 10**e for e in range(6) for m in (1, 2, 5) if m * 10**e <= 200_000)
# Feedback scores run from 0 to 10 (feedback.py): fine steps for 0-1 ratings, whole ones above.
SCORE_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0)
# Groundedness is a share of sentences, 0 to 1.
GROUNDEDNESS_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# A search of a VectorIndex: milliseconds in the same cluster, seconds only when it struggles.
RETRIEVAL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# How a rating was given: a thumb or a number.
RATINGS = ("up", "down", "score")

_REQUEST_LABELS = ("model", "prompt_name", "prompt_version")


@dataclass(frozen=True)
class PromptLabel:
    """The managed prompt (PromptVersion) a request used; a bounded set per deployment."""

    name: str
    version: str


class ServingMetrics:
    """The kvops_* metrics of one worker; one instance per server process, own registry."""

    def __init__(
        self,
        model_name: str,
        engine_stats: Callable[[], EngineStats],
        registry: CollectorRegistry | None = None,
    ):
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry()

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, _REQUEST_LABELS, buckets=buckets, registry=self.registry)

        def counter(name: str, doc: str, extra_labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, _REQUEST_LABELS + extra_labels, registry=self.registry)

        self._ttft = histogram(
            "kvops_time_to_first_token_seconds",
            "Time from arrival to the first output token.",
            TTFT_BUCKETS,
        )
        self._tpot = histogram(
            "kvops_time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            TPOT_BUCKETS,
        )
        self._e2e = histogram(
            "kvops_e2e_request_latency_seconds",
            "Time from arrival to the request's end.",
            LATENCY_BUCKETS,
        )
        self._queue = histogram(
            "kvops_request_queue_time_seconds",
            "Time from arrival to first being scheduled.",
            LATENCY_BUCKETS,
        )
        self._prompt_len = histogram(
            "kvops_request_prompt_tokens", "Prompt length of each request.", TOKEN_BUCKETS
        )
        self._output_len = histogram(
            "kvops_request_generation_tokens", "Output length of each request.", TOKEN_BUCKETS
        )
        self._prompt_tokens = counter(
            "kvops_prompt_tokens_total", "Prompt tokens of requests that were scheduled."
        )
        self._generation_tokens = counter(
            "kvops_generation_tokens_total", "Output tokens generated."
        )
        self._requests = counter(
            "kvops_requests_total",
            "Requests by how they ended.",
            ("finish_reason", "outcome"),
        )
        self._feedback = counter(
            "kvops_feedback_total", "Ratings of answers, by how they were given.", ("rating",)
        )
        self._feedback_score = histogram(
            "kvops_feedback_score", "Rated scores (thumbs up 1, down 0).", SCORE_BUCKETS
        )
        self._retrieval = Histogram(
            "kvops_retrieval_seconds",
            "Time to search the vector index for a request (RAG, /v1/search).",
            ["model"],
            buckets=RETRIEVAL_BUCKETS,
            registry=self.registry,
        )
        self._retrieval_errors = Counter(
            "kvops_retrieval_errors_total",
            "Searches of the vector index that failed (unreachable, timed out).",
            ["model"],
            registry=self.registry,
        )
        self._groundedness = histogram(
            "kvops_rag_groundedness",
            "Share of a RAG answer's sentences that a retrieved chunk supports.",
            GROUNDEDNESS_BUCKETS,
        )
        self._ungrounded = counter(
            "kvops_rag_ungrounded_answers_total",
            "RAG answers whose groundedness is below grounding.UNGROUNDED_BELOW (hallucinations).",
        )
        self.registry.register(_EngineStatsCollector(model_name, engine_stats))

    def record_finished(
        self,
        output: RequestOutput,
        *,
        prompt: PromptLabel | None = None,
        outcome: str = "success",
    ) -> None:
        """Record a request that reached the engine, from the last output it got.

        That is the finished output, or for a stream cancelled by its client or its deadline the
        last one received (outcome "aborted" or "timeout"); an unfinished one counts as an abort
        whose latency runs until now.
        """
        finish_reason = output.finish_reason if output.finished else "abort"
        finish_reason = finish_reason or ""
        _check_label("outcome", outcome, OUTCOMES)
        _check_label("finish_reason", finish_reason, FINISH_REASONS)
        labels = self._labels(prompt)
        arrival = output.arrival_time
        if output.first_scheduled_time is not None:
            self._queue.labels(*labels).observe(output.first_scheduled_time - arrival)
            # A request aborted while it waited never had its prompt computed.
            self._prompt_tokens.labels(*labels).inc(len(output.prompt_token_ids))
        if output.first_token_time is not None:
            self._ttft.labels(*labels).observe(output.first_token_time - arrival)
        end = output.finished_time if output.finished_time is not None else time.monotonic()
        self._e2e.labels(*labels).observe(end - arrival)
        decoded = len(output.token_ids) - 1
        # Only a finished output says when its last token came.
        if decoded > 0 and output.first_token_time is not None and output.finished_time is not None:
            self._tpot.labels(*labels).observe(
                (output.finished_time - output.first_token_time) / decoded
            )
        self._prompt_len.labels(*labels).observe(len(output.prompt_token_ids))
        self._output_len.labels(*labels).observe(len(output.token_ids))
        self._generation_tokens.labels(*labels).inc(len(output.token_ids))
        self._requests.labels(*labels, finish_reason, outcome).inc()

    def record_rejected(self, outcome: str, *, prompt: PromptLabel | None = None) -> None:
        """Count a request that ended before the engine produced an output for it."""
        _check_label("outcome", outcome, OUTCOMES)
        if outcome == "success":
            raise ValueError("a rejected request cannot have outcome 'success'")
        self._requests.labels(*self._labels(prompt), "", outcome).inc()

    def record_feedback(self, prompt: PromptLabel | None, rating: str, score: float) -> None:
        """Count a rating of an answer under the prompt version that produced it."""
        _check_label("rating", rating, RATINGS)
        labels = self._labels(prompt)
        self._feedback.labels(*labels, rating).inc()
        self._feedback_score.labels(*labels).observe(score)

    def record_retrieval(self, seconds: float) -> None:
        self._retrieval.labels(self.model_name).observe(seconds)

    def record_retrieval_error(self) -> None:
        self._retrieval_errors.labels(self.model_name).inc()

    def record_groundedness(
        self, score: float, ungrounded: bool, *, prompt: PromptLabel | None = None
    ) -> None:
        """One RAG answer's groundedness, under the prompt version that produced it."""
        labels = self._labels(prompt)
        self._groundedness.labels(*labels).observe(score)
        if ungrounded:
            self._ungrounded.labels(*labels).inc()

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The body and Content-Type for GET /metrics (OpenMetrics if `accept` asks for it)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def _labels(self, prompt: PromptLabel | None) -> tuple[str, str, str]:
        if prompt is None:
            return (self.model_name, "", "")
        return (self.model_name, prompt.name, prompt.version)


def _check_label(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


class _EngineStatsCollector(Collector):
    """Engine gauges and counters, read from one stats snapshot per scrape."""

    def __init__(self, model_name: str, engine_stats: Callable[[], EngineStats]):
        self._model_name = model_name
        self._engine_stats = engine_stats

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._engine_stats()
        model = [self._model_name]
        for family, name, doc, value in (
            (GaugeMetricFamily, "kvops_num_requests_running", "Requests being computed.",
             stats.num_running),
            (GaugeMetricFamily, "kvops_num_requests_waiting", "Requests waiting to be scheduled.",
             stats.num_waiting),
            (GaugeMetricFamily, "kvops_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.",
             stats.kv_cache_usage),
            (CounterMetricFamily, "kvops_preemptions_total",
             "Requests preempted to free KV-cache blocks.", stats.num_preemptions),
            (CounterMetricFamily, "kvops_prefix_cache_queries_total",
             "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries),
            (CounterMetricFamily, "kvops_prefix_cache_hits_total",
             "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits),
        ):  # fmt: skip
            metric = family(name, doc, labels=["model"])
            metric.add_metric(model, value)
            yield metric
        # A replica's memory: what its weights and KV cache take, and the process as a whole.
        weights = GaugeMetricFamily(
            "kvops_model_weight_bytes",
            "Bytes of the model's weights as held (quantized blocks as stored).",
            labels=["model", "quantization"],
        )
        weights.add_metric([*model, stats.quantization], stats.weight_bytes)
        yield weights
        kv_cache = GaugeMetricFamily(
            "kvops_kv_cache_bytes", "Bytes of the KV cache.", labels=["model"]
        )
        kv_cache.add_metric(model, stats.kv_cache_bytes)
        yield kv_cache
        resident = GaugeMetricFamily(
            "kvops_resident_memory_bytes",
            "Resident memory of the worker process.",
            labels=["model"],
        )
        resident.add_metric(model, resident_memory_bytes())
        yield resident


# ------------------------------------------------------------------------------------ tracing

# The gen_ai.provider.name a self-hosted engine reports: its own name.
PROVIDER_NAME = "kvops"
OPERATIONS = ("chat", "text_completion", "generate")


def configure_tracing(service_name: str = "kvops-worker") -> TracerProvider | None:
    """A TracerProvider exporting as the standard OTEL_* variables say, or None when tracing is off.

    On when OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set, or when
    OTEL_TRACES_EXPORTER names an exporter ("otlp", or "console" to debug); off when
    OTEL_TRACES_EXPORTER is "none" or OTEL_SDK_DISABLED is true. OTEL_SERVICE_NAME and
    OTEL_RESOURCE_ATTRIBUTES name the service (`service_name` otherwise), OTEL_TRACES_SAMPLER picks
    the sampler. The first provider made in a process also becomes the global one (OpenTelemetry
    allows setting it only once); callers should pass the returned provider on explicitly and
    shut it down at exit to flush the last spans.
    """
    exporter = _exporter_from_env()
    if exporter is None:
        return None
    # Resource.create() reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; without either it
    # names the service "unknown_service:python", which our default replaces.
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service_name}))
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(exporter))
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)
    return provider


def _exporter_from_env() -> SpanExporter | None:
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n]
    if not names:
        endpoint_set = any(
            env.get(key)
            for key in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        )
        names = ["otlp"] if endpoint_set else []
    if not names or names == ["none"]:
        return None
    if len(names) > 1 or names[0] not in ("otlp", "console"):
        raise ValueError(
            "OTEL_TRACES_EXPORTER must be otlp, console or none, "
            f"got {env['OTEL_TRACES_EXPORTER']!r}"
        )
    if names[0] == "console":
        return ConsoleSpanExporter()
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    if protocol != "grpc":
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL {protocol!r} is not supported: the worker exports "
            "OTLP over gRPC only (set it to grpc or leave it unset)"
        )
    # Imported here: the exporter pulls in protobuf stubs that a worker without tracing never needs.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, TLS and timeout from OTEL_EXPORTER_OTLP_*


# HTTP headers (a mapping) or gRPC invocation metadata (a sequence of key/value pairs).
Carrier = Mapping[str, str] | Sequence[tuple[str, str | bytes]]


class RequestTracer:
    """Server spans for requests; with no provider every call is a near-free no-op."""

    def __init__(self, provider: trace.TracerProvider | None):
        self._tracer = provider.get_tracer(__name__) if provider is not None else None

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def start_span(
        self,
        operation: str,
        model: str,
        params: SamplingParams,
        carrier: Carrier | None = None,
        *,
        stream: bool = False,
        choice_count: int = 1,
        prompt: PromptLabel | None = None,
        start_time: int | None = None,
    ) -> Span:
        """Start the SERVER span of one request, parented to the caller's W3C trace context;
        `start_time` (epoch ns) when the request began before generation (retrieval)."""
        if self._tracer is None:
            return trace.INVALID_SPAN
        if operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {OPERATIONS}, got {operation!r}")
        attributes: dict[str, str | bool | int | float | list[str]] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": PROVIDER_NAME,
            "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": params.max_tokens,
            "gen_ai.request.temperature": params.temperature,
            "gen_ai.request.top_p": params.top_p,
            "gen_ai.request.stream": stream,
        }
        if params.top_k:
            attributes["gen_ai.request.top_k"] = params.top_k
        if params.seed is not None:
            attributes["gen_ai.request.seed"] = params.seed
        if params.stop:
            attributes["gen_ai.request.stop_sequences"] = list(params.stop)
        if choice_count != 1:
            attributes["gen_ai.request.choice.count"] = choice_count
        if prompt is not None:
            attributes.update(_prompt_attributes(prompt))
        return self._tracer.start_span(
            f"{operation} {model}",
            context=_extract_context(carrier),
            kind=SpanKind.SERVER,
            attributes=attributes,
            start_time=start_time,
        )

    def finish_span(
        self,
        span: Span,
        outputs: Sequence[RequestOutput] = (),
        error: BaseException | None = None,
        *,
        response_id: str | None = None,
    ) -> None:
        """End the span with usage, finish reasons, errors and queue/prefill/decode children.

        `outputs` are the final outputs of the request's choices (several when n > 1); the prompt
        is shared, so input usage comes from the first one. `response_id` is the id the client
        sees (e.g. "chatcmpl-..."); the first engine request id by default.
        """
        if not span.is_recording():
            return
        if outputs:
            first = outputs[0]
            span.set_attributes(
                {
                    "gen_ai.response.id": response_id or first.request_id,
                    "gen_ai.response.finish_reasons": [o.finish_reason or "" for o in outputs],
                    "gen_ai.usage.input_tokens": len(first.prompt_token_ids),
                    "gen_ai.usage.cache_read.input_tokens": first.num_cached_tokens,
                    "gen_ai.usage.output_tokens": sum(len(o.token_ids) for o in outputs),
                }
            )
            for index, output in enumerate(outputs):
                self._add_phase_spans(span, output, index if len(outputs) > 1 else None)
        if error is not None:
            span.set_attribute("error.type", type(error).__qualname__)
            span.set_status(Status(StatusCode.ERROR, type(error).__qualname__))
        span.end()

    def record_feedback(
        self,
        request_span: SpanContext | None,
        model: str,
        prompt: PromptLabel | None,
        response_id: str,
        rating: str,
        score: float,
    ) -> None:
        """A "feedback" span in the rated request's trace, as a child of its SERVER span (which
        has ended by then). The comment stays out of traces, like all client text."""
        if self._tracer is None or request_span is None or not request_span.is_valid:
            return
        attributes: dict[str, str | float] = {
            "gen_ai.request.model": model,
            "gen_ai.response.id": response_id,
            "kvops.feedback.rating": rating,
            "kvops.feedback.score": score,
        }
        if prompt is not None:
            attributes.update(_prompt_attributes(prompt))
        context = trace.set_span_in_context(trace.NonRecordingSpan(request_span))
        self._tracer.start_span(f"feedback {model}", context=context, attributes=attributes).end()

    def record_retrieval(
        self,
        request_span: SpanContext | None,
        carrier: Carrier | None,
        *,
        address: str,
        top_k: int,
        hits: int,
        started_ns: int,
        seconds: float,
        prompt: PromptLabel | None = None,
        groundedness: float | None = None,
        ungrounded_sentences: int | None = None,
        error: str | None = None,
    ) -> None:
        """The "retrieval" span of a RAG request, recorded once its answer is scored: a child of
        the request's SERVER span, or of the caller's context when retrieval failed before any
        request span existed. It carries the answer's groundedness, never chunk text."""
        if self._tracer is None:
            return
        if request_span is not None and request_span.is_valid:
            context = trace.set_span_in_context(trace.NonRecordingSpan(request_span))
        else:
            context = _extract_context(carrier)
        attributes: dict[str, str | int | float] = {
            "kvops.retrieval.index_address": address,
            "kvops.retrieval.top_k": top_k,
            "kvops.retrieval.hits": hits,
            "kvops.retrieval.latency_s": seconds,
        }
        if prompt is not None:
            attributes.update(_prompt_attributes(prompt))
        if groundedness is not None:
            attributes["kvops.rag.groundedness"] = groundedness
        if ungrounded_sentences is not None:
            attributes["kvops.rag.ungrounded_sentences"] = ungrounded_sentences
        span = self._tracer.start_span(
            "retrieval",
            context=context,
            kind=SpanKind.CLIENT,
            attributes=attributes,
            start_time=started_ns,
        )
        if error is not None:
            span.set_attribute("error.type", error)
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=started_ns + int(seconds * 1e9))

    def _add_phase_spans(self, parent: Span, output: RequestOutput, index: int | None) -> None:
        """Children from the engine's monotonic timestamps, converted to epoch nanoseconds."""
        tracer = self._tracer
        if tracer is None:  # no provider: spans are not recording, so finish_span never gets here
            return
        epoch_offset_ns = time.time_ns() - time.monotonic_ns()
        end = output.finished_time if output.finished_time is not None else time.monotonic()
        marks = [
            ("queue", output.arrival_time),
            ("prefill", output.first_scheduled_time),
            ("decode", output.first_token_time),
        ]
        # A phase the request never reached (aborted while waiting, say) is left out, and the
        # last phase it reached runs until the end.
        reached = [(name, start) for name, start in marks if start is not None]
        context = trace.set_span_in_context(parent)
        attributes = {} if index is None else {"gen_ai.response.choice.index": index}
        for (name, start), (_, next_start) in zip(
            reached, reached[1:] + [("end", end)], strict=True
        ):
            child = tracer.start_span(
                name,
                context=context,
                start_time=epoch_offset_ns + int(start * 1e9),
                attributes=attributes,
            )
            child.end(end_time=epoch_offset_ns + int(next_start * 1e9))


def _prompt_attributes(prompt: PromptLabel) -> dict[str, str]:
    # gen_ai.prompt.name is the GenAI conventions' own; they have no prompt version (yet).
    return {"gen_ai.prompt.name": prompt.name, "kvops.prompt.version": prompt.version}


def _extract_context(carrier: Carrier | None):
    """The remote trace context in HTTP headers or gRPC metadata (case-insensitive keys)."""
    if not carrier:
        return None
    pairs = carrier.items() if isinstance(carrier, Mapping) else carrier
    # Binary ("-bin") gRPC metadata carries no W3C context; header names are case-insensitive.
    headers = {key.lower(): value for key, value in pairs if isinstance(value, str)}
    return propagate.extract(headers)
