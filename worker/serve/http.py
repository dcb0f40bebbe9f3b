"""The OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions with RAG,
/v1/embeddings), kvops' /v1/feedback and /v1/search, and probes.

Bodies are read and parsed here rather than by a framework so that every malformed input
(oversized, invalid UTF-8, bad JSON, a wrong field) gets a 400 that names the problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TypeVar, cast

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import HTTPExceptionHandler

from kvops.worker.request import RequestOutput, SamplingParams
from kvops.worker.serve import openai_protocol as protocol
from kvops.worker.serve.prompts import ResolvedPrompt
from kvops.worker.serve.retrieval import RagAnswer, Retrieval, Retrieved
from kvops.worker.serve.service import (
    InvalidRequest,
    Overloaded,
    ServingError,
    ServingState,
    ShuttingDown,
    attributed_to,
)

log = logging.getLogger(__name__)

# Far above any prompt that fits a context window; it bounds the memory one request can take.
MAX_BODY_BYTES = 4 * 1024 * 1024
# A client may ask for a shorter deadline than the server's with this header (seconds).
TIMEOUT_HEADER = "x-request-timeout"

Body = TypeVar("Body", bound=BaseModel)
E = TypeVar("E", bound=Exception)


def create_app(state: ServingState, retrieval: Retrieval | None = None) -> Starlette:
    """`retrieval` is shared with the gRPC server (one embedder); by default, the app's own."""
    started = int(time.time())
    rag = retrieval or Retrieval(state)

    async def health(request: Request) -> Response:
        alive = state.engine.is_alive
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, 200 if alive else 503)

    async def ready(request: Request) -> Response:
        if state.ready:
            return JSONResponse({"status": "ready", "model": state.model_name})
        return JSONResponse({"status": "draining" if state.draining else "not ready"}, 503)

    async def metrics(request: Request) -> Response:
        body, content_type = state.metrics.exposition(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    async def models(request: Request) -> Response:
        _authenticate(state, request)
        model = {
            "id": state.model_name,
            "object": "model",
            "created": started,
            "owned_by": "kvops",
            "max_model_len": state.engine.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [model]})

    async def chat_completions(request: Request) -> Response:
        _authenticate(state, request)
        body = await _read_body(request, protocol.ChatCompletionRequest)
        state.check_model(body.model)
        reference = body.prompt
        prompt = None
        if reference is not None:
            prompt = state.resolve_prompt(reference.name, reference.version, reference.label)
            body = body.with_defaults(prompt.model_parameters)
        with attributed_to(prompt):
            started_ns = time.time_ns()
            own = body.template_messages()
            if prompt is None and not own:
                raise InvalidRequest("messages must not be empty (or name a prompt)", "messages")
            variables = {} if body.prompt is None else body.prompt.variables
            messages, retrieved = await rag.chat_messages(
                body.retrieval, prompt, variables, own, request.headers
            )
            return await _chat_completion(request, body, prompt, messages, retrieved, started_ns)

    async def _chat_completion(
        request: Request,
        body: protocol.ChatCompletionRequest,
        prompt: ResolvedPrompt | None,
        messages: list[dict[str, str]],
        retrieved: Retrieved | None,
        started_ns: int,
    ) -> Response:
        prompt_ids = state.chat_prompt_ids(messages)
        max_tokens = body.requested_max_tokens() or state.remaining_context(prompt_ids)
        params = [body.sampling_params(max_tokens, body.logprobs_count(), i) for i in range(body.n)]
        call = _Call(state, request, "chat", "chatcmpl", prompt_ids, params, body.stream, prompt)
        if retrieved is not None:
            call.retrieve_with(rag, retrieved, started_ns)

        def choice(index: int, output: RequestOutput) -> dict:
            return {
                "index": index,
                "message": {"role": "assistant", "content": output.text},
                "logprobs": protocol.chat_logprobs(output.logprobs, state.token_text),
                "finish_reason": output.finish_reason,
            }

        chunks = functools.partial(_chat_chunks, call, body.include_usage)
        return await call.respond("chat.completion", choice, chunks)

    async def completions(request: Request) -> Response:
        _authenticate(state, request)
        body = await _read_body(request, protocol.CompletionRequest)
        state.check_model(body.model)
        if isinstance(body.prompt, str):
            prompt_ids = state.text_prompt_ids(body.prompt)
        else:
            prompt_ids = list(body.prompt)
        params = [body.sampling_params(body.max_tokens, body.logprobs, i) for i in range(body.n)]
        call = _Call(state, request, "text_completion", "cmpl", prompt_ids, params, body.stream)

        def choice(index: int, output: RequestOutput) -> dict:
            return {
                "index": index,
                "text": output.text,
                "logprobs": protocol.completion_logprobs(output.logprobs, state.token_text, 0),
                "finish_reason": output.finish_reason,
            }

        chunks = functools.partial(_completion_chunks, call, body.include_usage)
        return await call.respond("text_completion", choice, chunks)

    async def feedback(request: Request) -> Response:
        _authenticate(state, request)
        body = await _read_body(request, protocol.FeedbackRequest)
        answered, rating = await state.feedback(body.request_id, body.score, body.comment)
        used = answered.prompt
        return JSONResponse(
            {
                "request_id": body.request_id,
                "model": answered.model,
                "prompt": None if used is None else dataclasses.asdict(used),
                "score": rating.score,
                "rating": rating.kind,
            }
        )

    async def embeddings(request: Request) -> Response:
        _authenticate(state, request)
        body = await _read_body(request, protocol.EmbeddingsRequest)
        rag.check_embedding_model(body.model)
        vectors, tokens = await rag.embed(body.inputs())
        return JSONResponse(
            protocol.embeddings(vectors, body.encoding_format, rag.embedding_model, tokens)
        )

    async def search(request: Request) -> Response:
        _authenticate(state, request)
        body = await _read_body(request, protocol.SearchRequest)
        return JSONResponse({"hits": await rag.search(body.query, body.top_k, body.filters)})

    async def serving_error(request: Request, error: ServingError) -> Response:
        state.record_error(error)
        headers = {}
        if isinstance(error, Overloaded | ShuttingDown):
            headers["Retry-After"] = str(Overloaded.retry_after_s)
        body = protocol.error_body(error.message, error.error_type, error.param)
        return JSONResponse(body, error.http_status, headers=headers)

    async def http_error(request: Request, error: HTTPException) -> Response:
        # Unknown paths and wrong methods, in OpenAI's error shape like every other error.
        body = protocol.error_body(error.detail, "invalid_request_error", None)
        return JSONResponse(body, error.status_code, headers=error.headers)

    async def unexpected_error(request: Request, error: Exception) -> Response:
        log.exception("request failed")
        body = protocol.error_body("internal server error", "server_error", None)
        return JSONResponse(body, 500)

    routes = [
        Route("/health", health),
        Route("/ready", ready),
        Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/feedback", feedback, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/search", search, methods=["POST"]),
    ]
    handlers = [
        _handler(ServingError, serving_error),
        _handler(HTTPException, http_error),
        _handler(Exception, unexpected_error),
    ]
    return Starlette(routes=routes, exception_handlers=dict(handlers))


def _handler(
    kind: type[E], handle: Callable[[Request, E], Awaitable[Response]]
) -> tuple[type[Exception], HTTPExceptionHandler]:
    """An exception_handlers entry whose handler takes exactly the exceptions of its key.

    Starlette calls a handler only with instances of the class it is registered under, which its
    HTTPExceptionHandler type (any Exception) cannot say; the cast is sound for that reason.
    """
    return kind, cast(HTTPExceptionHandler, handle)


class _Call:
    """One HTTP request's n engine requests: admission, deadline, streaming or collecting."""

    def __init__(
        self,
        state: ServingState,
        request: Request,
        operation: str,
        id_prefix: str,
        prompt_ids: list[int],
        params: list[SamplingParams],
        stream: bool,
        prompt: ResolvedPrompt | None = None,
    ):
        self.state = state
        self.request = request
        self.operation = operation
        self.request_id = state.new_request_id(id_prefix)
        # Refuse what the engine would refuse before any response (or stream) starts.
        self.requests = state.make_requests(prompt_ids, params, self.request_id)
        self.created = int(time.time())
        self.prompt_ids = prompt_ids
        self.streaming = stream
        self.timeout = _client_timeout(request)
        self.prompt = prompt
        # RAG: the chunks the prompt holds, and when the request began (before retrieval).
        self.rag: RagAnswer | None = None
        self.started_ns: int | None = None
        # Each choice's final output, by index, as a stream ends them.
        self.finished: dict[int, RequestOutput] = {}

    def retrieve_with(self, retrieval: Retrieval, retrieved: Retrieved, started_ns: int) -> None:
        label = None if self.prompt is None else self.prompt.label
        self.rag = RagAnswer(retrieval, retrieved, label, self.request_id)
        self.started_ns = started_ns

    def outputs(self) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """(choice index, output) as the engine produces them, merged over the n choices."""
        return self.state.generate(
            self.requests,
            self.request_id,
            operation=self.operation,
            carrier=self.request.headers,
            stream=self.streaming,
            timeout=self.timeout,
            prompt=None if self.prompt is None else self.prompt.label,
            started_ns=self.started_ns,
        )

    async def collect(self) -> list[RequestOutput]:
        """Each choice's final output; a client that disconnects first aborts them all."""
        finals: list[RequestOutput | None] = [None] * len(self.requests)

        async def run() -> None:
            async with contextlib.aclosing(self.outputs()) as outputs:
                async for index, output in outputs:
                    if output.finished:
                        finals[index] = output

        with self.state.admit(len(self.requests)):
            await _unless_disconnected(self.request, run())
        return finals  # type: ignore[return-value]

    async def respond(
        self,
        obj: str,
        choice: Callable[[int, RequestOutput], dict],
        chunks: Callable[[], AsyncGenerator[dict, None]],
    ) -> Response:
        """The event stream of `chunks()`, or once all choices finished, one `obj` response."""
        if self.streaming:
            # The slots are held until the stream ends, however it ends (see _EventStream).
            admission = contextlib.ExitStack()
            admission.enter_context(self.state.admit(len(self.requests)))
            events = _server_sent_events(self.state, chunks())
            return _EventStream(events, on_close=admission.close)
        try:
            finals = await self.collect()
            grounded = await self.groundedness(finals)
        finally:
            self.report_unscored()
        body = {
            **protocol.envelope(self.request_id, obj, self.state.model_name, self.created),
            "choices": [choice(i, output) for i, output in enumerate(finals)],
            "usage": protocol.usage(len(self.prompt_ids), finals),
            **self.prompt_used(),
            **self.citations(),
            **grounded,
        }
        return JSONResponse(body)

    def citations(self) -> dict:
        """The `citations` field of a RAG response (and of its first chunk)."""
        return {} if self.rag is None else {"citations": self.rag.retrieved.citations()}

    async def groundedness(self, finals: list[RequestOutput]) -> dict:
        """The `groundedness` field of a RAG response (its first choice's), scored and recorded
        with the retrieval span."""
        if self.rag is None:
            return {}
        return {"groundedness": await self.rag.score([output.text for output in finals])}

    def report_unscored(self) -> None:
        """A RAG request that ended without a scored answer still records its retrieval."""
        if self.rag is not None:
            self.rag.report_unscored()

    def prompt_used(self) -> dict:
        """The `prompt` field of the response (and its first chunk), if it used one."""
        prompt = self.prompt
        if prompt is None:
            return {}
        return protocol.prompt_used(prompt.name, prompt.version, prompt.content_hash)

    def chunk(self, obj: str, choices: list[dict]) -> dict:
        return {
            **protocol.envelope(self.request_id, obj, self.state.model_name, self.created),
            "choices": choices,
        }


async def _chat_chunks(call: _Call, include_usage: bool):
    def delta(index: int, output: RequestOutput) -> dict:
        return {
            "index": index,
            "delta": {"content": output.new_text} if output.new_text else {},
            "logprobs": protocol.chat_logprobs(output.new_logprobs, call.state.token_text),
            "finish_reason": output.finish_reason if output.finished else None,
        }

    obj = "chat.completion.chunk"
    for i in range(len(call.requests)):
        opening = {"role": "assistant", "content": ""}
        chunk = call.chunk(obj, [{"index": i, "delta": opening, "finish_reason": None}])
        yield {**chunk, **call.prompt_used(), **call.citations()} if i == 0 else chunk
    try:
        async for chunk in _delta_chunks(call, obj, include_usage, delta):
            yield chunk
        if call.rag is not None:
            finals = [call.finished[i] for i in sorted(call.finished)]
            yield {**call.chunk(obj, []), **await call.groundedness(finals)}
    finally:
        call.report_unscored()


async def _completion_chunks(call: _Call, include_usage: bool):
    offsets = [0] * len(call.requests)  # characters of text sent so far, per choice

    def delta(index: int, output: RequestOutput) -> dict:
        logprobs = protocol.completion_logprobs(
            output.new_logprobs, call.state.token_text, offsets[index]
        )
        offsets[index] += len(output.new_text)
        return {
            "index": index,
            "text": output.new_text,
            "logprobs": logprobs,
            "finish_reason": output.finish_reason if output.finished else None,
        }

    async for chunk in _delta_chunks(call, "text_completion", include_usage, delta):
        yield chunk


async def _delta_chunks(
    call: _Call,
    obj: str,
    include_usage: bool,
    delta: Callable[[int, RequestOutput], dict],
):
    """One chunk per output that carries something (`delta` builds its choice), then the usage
    chunk when the client asked for it."""
    finals = []
    async with contextlib.aclosing(call.outputs()) as outputs:
        async for index, output in outputs:
            if not (output.new_text or output.finished or output.new_logprobs):
                continue
            yield call.chunk(obj, [delta(index, output)])
            if output.finished:
                finals.append(output)
                call.finished[index] = output
    if include_usage:
        yield {**call.chunk(obj, []), "usage": protocol.usage(len(call.prompt_ids), finals)}


async def _server_sent_events(
    state: ServingState, events: AsyncGenerator[dict, None]
) -> AsyncGenerator[str, None]:
    """SSE framing; an error after the stream started travels as an error event."""
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
    except ServingError as error:
        state.record_error(error)
        body = protocol.error_body(error.message, error.error_type, error.param)
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """A server-sent event stream that releases its admission slots however it ends.

    Starlette cancels a streaming response when the client disconnects, sometimes before the
    body iterator has started, so the release cannot live in the iterator itself.
    """

    def __init__(self, content: AsyncGenerator[str, None], on_close: Callable[[], object]):
        super().__init__(content, media_type="text/event-stream")
        self.headers["Cache-Control"] = "no-cache"
        self._content = content  # the body_iterator, typed as the generator it is (for aclose)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self._content.aclose()
            self._on_close()


async def _unless_disconnected(request: Request, work) -> None:
    """Run `work`; if the client hangs up first, cancel it (which aborts its engine requests)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.done() and not task.cancelled():
        task.result()


async def _read_body(request: Request, model: type[Body]) -> Body:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise InvalidRequest(f"the request body exceeds {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise InvalidRequest(f"the request body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidRequest(f"the request body is not valid UTF-8 (byte {error.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidRequest(
            f"malformed JSON: {error.msg} (line {error.lineno}, column {error.colno})"
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise InvalidRequest(f"{field}: {first['msg']}", param=field) from None


def _authenticate(state: ServingState, request: Request) -> None:
    state.authenticate(request.headers.get("authorization"))


def _client_timeout(request: Request) -> float | None:
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        timeout = float(value)
    except ValueError:
        timeout = 0
    if not timeout > 0:
        raise InvalidRequest(f"{TIMEOUT_HEADER} must be a number of seconds > 0", TIMEOUT_HEADER)
    return timeout
