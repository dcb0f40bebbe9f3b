"""`kvops index serve`: one loaded index behind HTTP (GET /health, /ready, /metrics, /v1/models,
POST /v1/search, OpenAI's POST /v1/embeddings) and gRPC (kvops.v1.Engine's Search and Embed;
the other RPCs answer UNIMPLEMENTED), plus the standard gRPC health service and reflection.

Embedding and search run on one worker thread: torch's OpenMP keeps a thread pool per calling
thread, and more pools than CPUs make every parallel region wait for its workers to wake
(bench/results/README.md, serve_load). The index and the embedder load before the servers
listen, so a broken index exits with its reason instead of serving errors.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import struct
import time
from dataclasses import dataclass

import grpc
import prometheus_client
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvops.v1 import engine_pb2, engine_pb2_grpc
from kvops.worker.rag.embedding import Embedder, embedder_for
from kvops.worker.rag.index import Hit, VectorIndex
from kvops.worker.serve.listen import HttpServer, start_listening, stop_on_signals

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 3
MAX_TOP_K = 1000
# OpenAI's own limit on inputs per embeddings request.
MAX_EMBED_INPUTS = 2048
SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["Engine"].full_name


@dataclass
class SearchServerOptions:
    index: str
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 50051


class BadRequest(ValueError):
    """A request the caller must fix: HTTP 400, gRPC INVALID_ARGUMENT."""


class SearchService:
    """The index and its embedder, the one thread that runs them, and the metrics."""

    def __init__(
        self,
        index: VectorIndex,
        embedder: Embedder,
        executor: concurrent.futures.ThreadPoolExecutor | None = None,
    ) -> None:
        if embedder.dimension != index.dimension:
            raise ValueError(
                f"the index holds {index.dimension}-d vectors, its embedder {index.embedder!r} "
                f"makes {embedder.dimension}-d ones"
            )
        self.index = index
        self.embedder = embedder
        self.executor = executor or concurrent.futures.ThreadPoolExecutor(1)
        self.draining = False
        self.registry = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter(
            "kvops_index_requests",
            "Search and embedding requests by operation and outcome",
            ["operation", "outcome"],
            registry=self.registry,
        )
        self.latency = prometheus_client.Histogram(
            "kvops_index_request_seconds",
            "Time to answer a search or embedding request",
            ["operation"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        chunks = prometheus_client.Gauge(
            "kvops_index_chunks", "Chunks in the served index", registry=self.registry
        )
        chunks.set(len(index))

    async def search(self, query: str, top_k: int, filters: dict[str, str]) -> list[Hit]:
        if not query.strip():
            raise BadRequest("query must not be empty")
        if not 1 <= top_k <= MAX_TOP_K:
            raise BadRequest(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
        if any(not isinstance(v, str) for v in filters.values()):
            raise BadRequest("filters must map keys to string values")

        def run() -> list[Hit]:
            [hits] = self.index.search(self.embedder.embed([query]), top_k, filters or None)
            return hits

        return await self._timed("search", run)

    async def embed(self, inputs: list[str]) -> list[list[float]]:
        if not inputs:
            raise BadRequest("input must not be empty")
        if len(inputs) > MAX_EMBED_INPUTS:
            raise BadRequest(f"at most {MAX_EMBED_INPUTS} inputs per request, got {len(inputs)}")
        if any(not isinstance(text, str) for text in inputs):
            raise BadRequest("input must be a string or a list of strings")
        return await self._timed("embed", lambda: self.embedder.embed(inputs).tolist())

    def count_tokens(self, inputs: list[str]) -> int:
        tokenizer = getattr(self.embedder, "tokenizer", None)
        if tokenizer is None:
            return 0
        return sum(len(e.ids) for e in tokenizer.encode_batch(inputs, add_special_tokens=True))

    def invalid(self, operation: str, error: BadRequest) -> str:
        """Count a refused request (by either protocol); its message for the caller."""
        self.requests.labels(operation, "invalid").inc()
        return str(error)

    async def _timed(self, operation: str, work):
        started = time.perf_counter()
        try:
            result = await asyncio.get_running_loop().run_in_executor(self.executor, work)
        except Exception:
            self.requests.labels(operation, "error").inc()
            raise
        self.requests.labels(operation, "ok").inc()
        self.latency.labels(operation).observe(time.perf_counter() - started)
        return result


# ----------------------------------------------------------------------------------------- HTTP


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


async def _json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError as error:
        raise BadRequest(f"the body is not JSON: {error}") from error
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def create_app(service: SearchService) -> Starlette:
    async def health_endpoint(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        if service.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ready", **service.index.manifest()})

    async def metrics(request: Request) -> Response:
        return Response(
            prometheus_client.generate_latest(service.registry),
            media_type=prometheus_client.CONTENT_TYPE_LATEST,
        )

    async def models(request: Request) -> Response:
        model = {"id": service.embedder.name, "object": "model", "owned_by": "kvops"}
        return JSONResponse({"object": "list", "data": [model]})

    async def search(request: Request) -> Response:
        try:
            body = await _json_body(request)
            query = body.get("query")
            if not isinstance(query, str):
                raise BadRequest("query must be a string")
            top_k = body.get("top_k", DEFAULT_TOP_K)
            filters = body.get("filters") or {}
            if not isinstance(top_k, int) or not isinstance(filters, dict):
                raise BadRequest("top_k must be an integer and filters an object")
            hits = await service.search(query, top_k, filters)
        except BadRequest as error:
            return _error(400, service.invalid("search", error))
        return JSONResponse({"hits": [hit.as_dict() for hit in hits]})

    async def embeddings(request: Request) -> Response:
        try:
            body = await _json_body(request)
            model = body.get("model")
            if model not in (None, "", service.embedder.name):
                return _error(
                    404,
                    f"model {model!r} not found; this server embeds with {service.embedder.name!r}",
                    "not_found_error",
                )
            inputs = body.get("input")
            inputs = [inputs] if isinstance(inputs, str) else inputs
            if not isinstance(inputs, list):
                raise BadRequest("input must be a string or a list of strings")
            encoding = body.get("encoding_format", "float")
            if encoding not in ("float", "base64"):
                raise BadRequest(f"encoding_format {encoding!r}: expected float or base64")
            vectors = await service.embed(inputs)
        except BadRequest as error:
            return _error(400, service.invalid("embed", error))
        tokens = service.count_tokens(inputs)
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(vector, encoding)}
            for i, vector in enumerate(vectors)
        ]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": service.embedder.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    return Starlette(
        routes=[
            Route("/health", health_endpoint),
            Route("/ready", ready),
            Route("/metrics", metrics),
            Route("/v1/models", models),
            Route("/v1/search", search, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
        ]
    )


def _encode(vector: list[float], encoding: str):
    """OpenAI's base64 form is the little-endian float32 bytes (what its client asks for)."""
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


# ----------------------------------------------------------------------------------------- gRPC


class IndexSearchService(engine_pb2_grpc.EngineServicer):
    def __init__(self, service: SearchService) -> None:
        self.service = service

    async def Search(self, request: engine_pb2.SearchRequest, context):  # noqa: N802
        try:
            hits = await self.service.search(
                request.query, request.top_k or DEFAULT_TOP_K, dict(request.filters)
            )
        except BadRequest as error:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, self.service.invalid("search", error)
            )
        return engine_pb2.SearchResponse(
            hits=[
                engine_pb2.SearchHit(
                    document_id=hit.chunk.source,
                    text=hit.chunk.text,
                    score=hit.score,
                    chunk_id=hit.chunk.id,
                    source=hit.chunk.source,
                    metadata=hit.chunk.metadata,
                )
                for hit in hits
            ]
        )

    async def Embed(self, request: engine_pb2.EmbedRequest, context):  # noqa: N802
        if request.model not in ("", self.service.embedder.name):
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model {request.model!r} not found; this server embeds with "
                f"{self.service.embedder.name!r}",
            )
        try:
            vectors = await self.service.embed(list(request.inputs))
        except BadRequest as error:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, self.service.invalid("embed", error)
            )
        return engine_pb2.EmbedResponse(
            embeddings=[engine_pb2.Embedding(values=vector) for vector in vectors]
        )


# ---------------------------------------------------------------------------------------- serve


def load_service(index_folder: str, executor=None) -> SearchService:
    index = VectorIndex.load(index_folder)
    return SearchService(index, embedder_for(index.embedder), executor)


async def serve_index(options: SearchServerOptions) -> int:
    # A *_created series per counter and histogram only doubles what a scrape stores.
    prometheus_client.disable_created_metrics()
    loop = asyncio.get_running_loop()
    # Loaded on the thread that will run every search.
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="search")
    service = await loop.run_in_executor(executor, load_service, options.index, executor)
    log.info("loaded %s: %s", options.index, service.index.manifest())

    grpc_server = grpc.aio.server()
    engine_pb2_grpc.add_EngineServicer_to_server(IndexSearchService(service), grpc_server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), grpc_server
    )
    grpc_server.add_insecure_port(f"{options.host}:{options.grpc_port}")
    http = HttpServer(
        uvicorn.Config(
            create_app(service), host=options.host, port=options.http_port, log_level="warning"
        )
    )
    stop = stop_on_signals()
    http_task = await start_listening(grpc_server, http, f"{options.host}:{options.http_port}")
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "kvops index serving %d chunks: http://%s:%d, grpc://%s:%d",
        len(service.index),
        options.host,
        options.http_port,
        options.host,
        options.grpc_port,
    )
    await stop.wait()
    service.draining = True
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    http.should_exit = True
    await grpc_server.stop(grace=5)
    await http_task
    executor.shutdown()
    return 0
