"""`kvops serve`: the HTTP and gRPC servers over one AsyncLLMEngine, and a graceful shutdown.

On SIGTERM (or SIGINT) readiness turns false and new requests are refused, the requests in
flight get `shutdown_grace` seconds to finish, then both servers stop and the process exits 0.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import prometheus_client
import uvicorn

from kvops.worker.async_engine import AsyncLLMEngine
from kvops.worker.serve import grpc as grpc_api
from kvops.worker.serve.http import create_app
from kvops.worker.serve.listen import HttpServer, start_listening, stop_on_signals
from kvops.worker.serve.retrieval import Retrieval
from kvops.worker.serve.service import ServingOptions, ServingState
from kvops.worker.serve.telemetry import RequestTracer, ServingMetrics, configure_tracing

log = logging.getLogger(__name__)


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 50051
    shutdown_grace: float = 30.0
    grpc_tls_cert: str | None = None
    grpc_tls_key: str | None = None

    def validate(self) -> None:
        if (self.grpc_tls_cert is None) != (self.grpc_tls_key is None):
            raise ValueError("grpc_tls_cert and grpc_tls_key must be given together")
        if self.shutdown_grace < 0:
            raise ValueError(f"shutdown_grace must be >= 0, got {self.shutdown_grace}")


async def serve(engine: AsyncLLMEngine, options: ServingOptions, server: ServerOptions) -> int:
    """Serve until SIGTERM or SIGINT; `server` is validated by the caller, before the slow model
    load."""
    # A *_created series per counter and histogram only doubles what a scrape stores.
    prometheus_client.disable_created_metrics()
    tracer_provider = configure_tracing()
    state = ServingState(
        engine,
        options,
        ServingMetrics(options.served_model_name, engine.stats),
        RequestTracer(tracer_provider),
    )
    retrieval = Retrieval(state)
    # With a vector index every RAG answer is scored: load the embedder before serving.
    await retrieval.start()
    grpc_server, health, grpc_port = grpc_api.create_server(
        state,
        f"{server.host}:{server.grpc_port}",
        _read(server.grpc_tls_cert),
        _read(server.grpc_tls_key),
        retrieval,
    )
    http = HttpServer(
        uvicorn.Config(
            create_app(state, retrieval),
            host=server.host,
            port=server.http_port,
            log_level="warning",
            # uvicorn takes whole seconds; rounded up, so it never cuts the grace period short.
            timeout_graceful_shutdown=math.ceil(max(server.shutdown_grace, 1)),
        )
    )
    stop = stop_on_signals()
    http_task = await start_listening(grpc_server, http, f"{server.host}:{server.http_port}")
    await grpc_api.set_serving(health, True)
    scheme = "grpcs" if server.grpc_tls_cert else "grpc"
    log.info(
        "kvops serving %s: http://%s:%d (OpenAI API), %s://%s:%d",
        state.model_name,
        server.host,
        server.http_port,
        scheme,
        server.host,
        grpc_port,
    )
    if retrieval.enabled:
        log.info(
            "RAG: vector index %s, top %d chunks per chat request",
            retrieval.address,
            retrieval.top_k,
        )

    await stop.wait()
    log.info("shutting down: draining %d request(s)", state.in_flight)
    state.draining = True
    await grpc_api.set_serving(health, False)
    if not await state.wait_idle(server.shutdown_grace):
        log.warning("grace period over: %d request(s) cut off", state.in_flight)
    http.should_exit = True
    await grpc_server.stop(grace=1)
    await http_task
    await retrieval.close()
    engine.shutdown()
    if tracer_provider is not None:
        tracer_provider.shutdown()
    return 0


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as file:
        return file.read()
