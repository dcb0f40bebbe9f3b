"""The worker's side of retrieval: Search over gRPC against a VectorIndex's search Service
(KVOPS_VECTOR_INDEX_ADDRESS, "host:port", the Service's gRPC port 50051)."""

from __future__ import annotations

import grpc

from kvops.v1 import engine_pb2, engine_pb2_grpc


class SearchUnavailable(ConnectionError):
    """The index server did not answer (down, unreachable, or past the deadline)."""


class SearchClient:
    def __init__(self, address: str, timeout: float = 10.0) -> None:
        host, colon, port = address.rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"vector index address {address!r}: expected host:port")
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address)
        self._stub = engine_pb2_grpc.EngineStub(self._channel)
        self._async_stub: engine_pb2_grpc.EngineStub | None = None
        self._async_channel: grpc.aio.Channel | None = None

    def search(self, query: str, top_k: int, filters: dict[str, str] | None = None) -> list[dict]:
        """Hits, best first: {chunk_id, source, text, score, metadata}."""
        try:
            response = self._stub.Search(self._request(query, top_k, filters), timeout=self.timeout)
        except grpc.RpcError as error:
            raise self._error(error) from error
        return _hits(response)

    async def search_async(
        self, query: str, top_k: int, filters: dict[str, str] | None = None
    ) -> list[dict]:
        """search() for an asyncio caller (the worker's servers); the channel is made on first
        use, in the caller's event loop."""
        if self._async_stub is None:
            self._async_channel = grpc.aio.insecure_channel(self.address)
            self._async_stub = engine_pb2_grpc.EngineStub(self._async_channel)
        try:
            response = await self._async_stub.Search(
                self._request(query, top_k, filters), timeout=self.timeout
            )
        except grpc.RpcError as error:
            raise self._error(error) from error
        return _hits(response)

    def close(self) -> None:
        self._channel.close()

    async def close_async(self) -> None:
        self.close()
        if self._async_channel is not None:
            await self._async_channel.close()

    @staticmethod
    def _request(query: str, top_k: int, filters: dict[str, str] | None):
        return engine_pb2.SearchRequest(query=query, top_k=top_k, filters=filters or {})

    def _error(self, error: grpc.RpcError) -> Exception:
        code = error.code()
        details = error.details()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return SearchUnavailable(f"vector index at {self.address} unreachable: {details}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return ValueError(f"vector index at {self.address}: {details}")
        return RuntimeError(f"vector index at {self.address}: {code.name}: {details}")


def _hits(response: engine_pb2.SearchResponse) -> list[dict]:
    return [
        {
            "chunk_id": hit.chunk_id,
            "source": hit.source,
            "text": hit.text,
            "score": hit.score,
            "metadata": dict(hit.metadata),
        }
        for hit in response.hits
    ]
