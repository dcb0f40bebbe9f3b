"""The gRPC API (kvops.v1.Engine), the standard health service and server reflection."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvops.operator.api import ModelParameters
from kvops.v1 import engine_pb2, engine_pb2_grpc
from kvops.worker.request import RequestOutput, SamplingParams
from kvops.worker.serve.openai_protocol import RetrievalField
from kvops.worker.serve.prompts import ResolvedPrompt
from kvops.worker.serve.retrieval import RagAnswer, Retrieval, Retrieved
from kvops.worker.serve.service import (
    InvalidRequest,
    Overloaded,
    ServingError,
    ServingState,
    Unauthenticated,
    attributed_to,
)
from kvops.worker.serve.telemetry import Carrier

SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["Engine"].full_name
# Probes and tooling need no key: the health and reflection services stay open.
_OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class EngineService(engine_pb2_grpc.EngineServicer):
    """Generate (with RAG for chat and managed prompts, as HTTP's chat completions), Tokenize,
    ListModels, RenderPrompt, Feedback, Embed and Search."""

    def __init__(self, state: ServingState, retrieval: Retrieval):
        self.state = state
        self.retrieval = retrieval

    async def Generate(self, request: engine_pb2.GenerateRequest, context):  # noqa: N802
        state = self.state
        try:
            state.check_model(request.model)
            prompt = None
            if request.HasField("prompt_reference"):
                prompt = self._resolve(request.prompt_reference)
            with attributed_to(prompt):
                started_ns = time.time_ns()  # the request span covers retrieval
                carrier = context.invocation_metadata()
                prompt_ids, retrieved = await self._input(request, prompt, carrier)
                params = _sampling_params(
                    request.sampling,
                    state.remaining_context(prompt_ids),
                    None if prompt is None else prompt.model_parameters,
                )
                request_id = request.request_id or state.new_request_id("gen")
                label = None if prompt is None else prompt.label
                rag = None
                if retrieved is not None:
                    rag = RagAnswer(self.retrieval, retrieved, label, request_id)
                requests = state.make_requests(prompt_ids, [params], request_id)
                outputs = state.generate(
                    requests,
                    request_id,
                    operation="generate",
                    carrier=carrier,
                    stream=True,
                    timeout=context.time_remaining(),
                    prompt=label,
                    started_ns=None if rag is None else started_ns,
                )
                responses = self._responses(request_id, outputs, prompt, rag)
                with state.admit():
                    try:
                        # Closed at once when the client cancels, so that the engine aborts then.
                        async with contextlib.aclosing(responses):
                            async for response in responses:
                                yield response
                    finally:
                        if rag is not None:
                            rag.report_unscored()
        except ServingError as error:
            await _abort(state, context, error)

    async def Tokenize(self, request: engine_pb2.TokenizeRequest, context):  # noqa: N802
        try:
            tokenizer = self.state.require_tokenizer("text")
        except ServingError as error:
            await _abort(self.state, context, error)
        ids = tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens)
        tokens = [tokenizer.id_to_token(i) or "" for i in ids]
        return engine_pb2.TokenizeResponse(token_ids=ids, tokens=tokens)

    async def ListModels(self, request: engine_pb2.ListModelsRequest, context):  # noqa: N802
        model = engine_pb2.Model(
            id=self.state.model_name, max_model_len=self.state.engine.max_model_len
        )
        return engine_pb2.ListModelsResponse(models=[model])

    async def RenderPrompt(self, request: engine_pb2.RenderPromptRequest, context):  # noqa: N802
        try:
            prompt = self._resolve(request.prompt)
            with attributed_to(prompt):
                messages = self.state.render_prompt(prompt, request.prompt.variables)
        except ServingError as error:
            await _abort(self.state, context, error)
        return engine_pb2.RenderPromptResponse(
            messages=[engine_pb2.ChatMessage(**m) for m in messages],
            prompt_used=_prompt_used(prompt),
        )

    async def Feedback(self, request: engine_pb2.FeedbackRequest, context):  # noqa: N802
        rating = request.WhichOneof("rating")
        try:
            if rating is None:
                raise InvalidRequest("one of score or thumb is required", "rating")
            answered, given = await self.state.feedback(
                request.request_id, getattr(request, rating), request.comment or None
            )
        except ServingError as error:
            await _abort(self.state, context, error)
        response = engine_pb2.FeedbackResponse(model=answered.model, score=given.score)
        if answered.prompt is not None:
            response.prompt.name = answered.prompt.name
            response.prompt.version = answered.prompt.version
        return response

    async def Embed(self, request: engine_pb2.EmbedRequest, context):  # noqa: N802
        try:
            self.retrieval.check_embedding_model(request.model)
            vectors, _ = await self.retrieval.embed(list(request.inputs))
        except ServingError as error:
            await _abort(self.state, context, error)
        return engine_pb2.EmbedResponse(
            embeddings=[engine_pb2.Embedding(values=vector) for vector in vectors]
        )

    async def Search(self, request: engine_pb2.SearchRequest, context):  # noqa: N802
        """A proxy to the configured VectorIndex; NOT_FOUND without one."""
        try:
            hits = await self.retrieval.search(
                request.query, request.top_k or None, dict(request.filters)
            )
        except ServingError as error:
            await _abort(self.state, context, error)
        return engine_pb2.SearchResponse(
            hits=[
                engine_pb2.SearchHit(
                    document_id=hit["source"],
                    text=hit["text"],
                    score=hit["score"],
                    chunk_id=hit["chunk_id"],
                    source=hit["source"],
                    metadata=hit["metadata"],
                )
                for hit in hits
            ]
        )

    def _resolve(self, reference: engine_pb2.PromptReference) -> ResolvedPrompt:
        return self.state.resolve_prompt(reference.name, reference.version, reference.label)

    async def _input(
        self, request: engine_pb2.GenerateRequest, prompt: ResolvedPrompt | None, carrier: Carrier
    ) -> tuple[list[int], Retrieved | None]:
        """The prompt's token ids, and the chunks retrieved into it (chat and managed prompts
        only: raw text and token ids are the client's own prompt, as in /v1/completions)."""
        kind = request.WhichOneof("input")
        requested = _retrieval_requested(request, self.retrieval)
        if prompt is None and kind in ("prompt", "prompt_token_ids"):
            if requested is not None and requested is not False:
                raise InvalidRequest(
                    f"retrieval needs chat messages or a prompt_reference, not {kind}",
                    "retrieval",
                )
            if kind == "prompt":
                return self.state.text_prompt_ids(request.prompt), None
            return list(request.prompt_token_ids.ids), None
        if prompt is not None and kind not in ("chat", None):
            raise InvalidRequest(
                f"prompt_reference takes chat messages or none, not {kind}", "input"
            )
        if prompt is None and kind is None:
            raise InvalidRequest(
                "one of prompt, prompt_token_ids, chat or prompt_reference is required", "input"
            )
        if prompt is None and not request.chat.messages:
            raise InvalidRequest("chat.messages must not be empty", "chat.messages")
        variables = {} if prompt is None else dict(request.prompt_reference.variables)
        messages, retrieved = await self.retrieval.chat_messages(
            requested, prompt, variables, _messages(request.chat), carrier
        )
        return self.state.chat_prompt_ids(messages), retrieved

    async def _responses(
        self,
        request_id: str,
        outputs: AsyncGenerator[tuple[int, RequestOutput], None],
        prompt: ResolvedPrompt | None,
        rag: RagAnswer | None,
    ) -> AsyncGenerator[engine_pb2.GenerateResponse, None]:
        """One message per output: the first with the prompt used and the citations, the last
        with the groundedness, scored once the request's span has ended (as HTTP does)."""
        final: RequestOutput | None = None
        last: engine_pb2.GenerateResponse | None = None
        async with contextlib.aclosing(outputs):
            first = True
            async for _, output in outputs:
                response = self._response(request_id, output)
                if first and prompt is not None:
                    response.prompt_used.CopyFrom(_prompt_used(prompt))
                if first and rag is not None:
                    response.citations.extend(
                        engine_pb2.Citation(**citation) for citation in rag.retrieved.citations()
                    )
                first = False
                if output.finished:
                    final, last = output, response
                else:
                    yield response
        if final is None or last is None:
            return
        if rag is not None:
            grounded = await rag.score([final.text])
            if grounded is not None:
                last.groundedness.CopyFrom(engine_pb2.Groundedness(**grounded))
        yield last

    def _response(self, request_id: str, output: RequestOutput) -> engine_pb2.GenerateResponse:
        token_text = self.state.token_text
        response = engine_pb2.GenerateResponse(
            request_id=request_id,
            token_ids=output.new_token_ids,
            text=output.new_text,
            logprobs=[
                engine_pb2.TokenLogprob(
                    token_id=item.token_id,
                    token=token_text(item.token_id),
                    logprob=item.logprob,
                    top=[
                        engine_pb2.TopLogprob(token_id=t, token=token_text(t), logprob=lp)
                        for t, lp in item.top.items()
                    ],
                )
                for item in output.new_logprobs or []
            ],
        )
        if output.finished:
            response.finish_reason = output.finish_reason or ""
            response.usage.CopyFrom(
                engine_pb2.Usage(
                    prompt_tokens=len(output.prompt_token_ids),
                    completion_tokens=len(output.token_ids),
                    cached_prompt_tokens=output.num_cached_tokens,
                )
            )
        return response


# Optional fields that, unset, take SamplingParams' defaults; temperature does not (engine.proto).
_ENGINE_DEFAULTED = ("top_p", "seed", "logprobs")


def _retrieval_requested(
    request: engine_pb2.GenerateRequest, retrieval: Retrieval
) -> bool | RetrievalField | None:
    """The `retrieval` option as HTTP's `retrieval` field reads: unset (None), disabled (False)
    or the request's top_k and filters."""
    if not request.HasField("retrieval"):
        return None
    options = request.retrieval
    if options.disabled:
        if options.top_k or options.filters:
            raise InvalidRequest(
                "retrieval.disabled takes no top_k or filters", "retrieval.disabled"
            )
        return False
    top_k = retrieval.checked_top_k(options.top_k) if options.top_k else None
    return RetrievalField(top_k=top_k, filters=dict(options.filters))


def _messages(chat: engine_pb2.ChatMessages) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in chat.messages]


def _prompt_used(prompt: ResolvedPrompt) -> engine_pb2.PromptUsed:
    return engine_pb2.PromptUsed(
        name=prompt.name, version=prompt.version, content_hash=prompt.content_hash
    )


def _sampling_params(
    sampling: engine_pb2.SamplingParams, context_left: int, prompt: ModelParameters | None
) -> SamplingParams:
    """The request's sampling; a managed prompt's model parameters fill what it leaves unset."""
    given = {name: getattr(sampling, name) for name in _ENGINE_DEFAULTED if sampling.HasField(name)}
    defaults = prompt or ModelParameters()
    if "top_p" not in given and defaults.top_p is not None:
        given["top_p"] = defaults.top_p
    if sampling.HasField("temperature"):
        temperature = sampling.temperature
    else:
        temperature = defaults.temperature if defaults.temperature is not None else 0.0
    return SamplingParams(
        max_tokens=sampling.max_tokens or defaults.max_tokens or context_left,
        temperature=temperature,
        top_k=sampling.top_k,
        stop=list(sampling.stop or defaults.stop),
        stop_token_ids=list(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
        **given,
    )


async def _abort(state: ServingState, context, error: ServingError) -> None:
    state.record_error(error)
    if isinstance(error, Overloaded):
        context.set_trailing_metadata((("retry-after-ms", str(error.retry_after_s * 1000)),))
    await context.abort(grpc.StatusCode[error.grpc_code], error.message)


class _ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Checks `authorization: Bearer <key>` metadata before any kvops RPC runs."""

    def __init__(self, state: ServingState):
        self.state = state

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(_OPEN_SERVICES):
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        try:
            self.state.authenticate(metadata.get("authorization"))
        except Unauthenticated as error:
            self.state.record_error(error)
            return _refusal(error, await continuation(details))
        return await continuation(details)


def _refusal(error: ServingError, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts with `error`."""

    async def refuse(request, context):
        await context.abort(grpc.StatusCode[error.grpc_code], error.message)

    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            refuse, handler.request_deserializer, handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        refuse, handler.request_deserializer, handler.response_serializer
    )


def create_server(
    state: ServingState,
    address: str,
    tls_cert: bytes | None = None,
    tls_key: bytes | None = None,
    retrieval: Retrieval | None = None,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """The server with its port bound (not started), its health servicer and the bound port;
    `retrieval` is shared with the HTTP server (one embedder), by default the server's own."""
    interceptors = [_ApiKeyInterceptor(state)] if state.options.api_key else []
    server = grpc.aio.server(interceptors=interceptors)
    service = EngineService(state, retrieval or Retrieval(state))
    engine_pb2_grpc.add_EngineServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if tls_cert is not None and tls_key is not None:
        credentials = grpc.ssl_server_credentials([(tls_key, tls_cert)])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    return server, health_servicer, port


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, status)
