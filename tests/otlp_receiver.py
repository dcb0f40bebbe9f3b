"""An in-process OTLP/gRPC trace receiver for tests: what a collector would have received.

Usage: start() returns the endpoint URL ("http://127.0.0.1:<port>") to put in
OTEL_EXPORTER_OTLP_ENDPOINT; wait_for_spans(n, timeout) returns what arrived or raises
TimeoutError; stop() (or leaving a `with OTLPReceiver() as receiver:` block) shuts it down.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


@dataclass
class ReceivedSpan:
    """One exported span, decoded; ids as lowercase hex like format_trace_id() gives."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    kind: int  # opentelemetry.proto Span.SpanKind: 2 is SERVER
    start_time_unix_nano: int
    end_time_unix_nano: int
    status_code: int  # 0 unset, 1 ok, 2 error
    attributes: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)


class OTLPReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Accepts OTLP trace exports on 127.0.0.1 and keeps every span it got."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._address = f"{host}:{port}"
        self._server: grpc.Server | None = None
        self._spans: list[ReceivedSpan] = []
        self._received = threading.Condition()
        self.endpoint = ""

    def start(self) -> str:
        """Start serving; returns the endpoint URL (plain-text gRPC)."""
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        port = self._server.add_insecure_port(self._address)
        self._server.start()
        self.endpoint = f"http://{self._address.rsplit(':', 1)[0]}:{port}"
        return self.endpoint

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(timeout=5)
            self._server = None

    def __enter__(self) -> OTLPReceiver:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._received:
            return list(self._spans)

    def wait_for_spans(self, count: int, timeout: float = 10.0) -> list[ReceivedSpan]:
        """Every span received once there are at least `count`; TimeoutError if they never come."""
        deadline = time.monotonic() + timeout
        with self._received:
            while len(self._spans) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"got {len(self._spans)} spans, wanted {count}, within {timeout}s"
                    )
                self._received.wait(left)
            return list(self._spans)

    def Export(self, request, context):  # noqa: N802 - the generated servicer's method name
        decoded = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    decoded.append(
                        ReceivedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            start_time_unix_nano=span.start_time_unix_nano,
                            end_time_unix_nano=span.end_time_unix_nano,
                            status_code=span.status.code,
                            attributes=_attributes(span.attributes),
                            resource=resource,
                        )
                    )
        with self._received:
            self._spans.extend(decoded)
            self._received.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()


def _attributes(key_values: list[KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in key_values}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None
