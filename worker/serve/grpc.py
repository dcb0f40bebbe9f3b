"""The gRPC API (kvops.v1.Engine), the standard health service and server reflection."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvops.v1 import engine_pb2, engine_pb2_grpc
from kvops.worker.request import RequestOutput, SamplingParams
from kvops.worker.serve.service import (
    InvalidRequest,
    Overloaded,
    ServingError,
    ServingState,
    Unauthenticated,
)

SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["Engine"].full_name
# Probes and tooling need no key: the health and reflection services stay open.
_OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class EngineService(engine_pb2_grpc.EngineServicer):
    """Generate, Tokenize and ListModels; the RPCs of later features stay UNIMPLEMENTED."""

    def __init__(self, state: ServingState):
        self.state = state

    async def Generate(self, request: engine_pb2.GenerateRequest, context):  # noqa: N802
        state = self.state
        try:
            state.check_model(request.model)
            prompt_ids = self._prompt_ids(request)
            params = _sampling_params(request.sampling, state.remaining_context(prompt_ids))
            request_id = request.request_id or state.new_request_id("gen")
            requests = state.make_requests(prompt_ids, [params], request_id)
            outputs = state.generate(
                requests,
                request_id,
                operation="generate",
                carrier=context.invocation_metadata(),
                stream=True,
                timeout=context.time_remaining(),
            )
            # Closed at once when the client cancels, so that the engine aborts the request then.
            with state.admit():
                async with contextlib.aclosing(outputs):
                    async for _, output in outputs:
                        yield self._response(request_id, output)
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

    def _prompt_ids(self, request: engine_pb2.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("input")
        if kind == "prompt":
            return self.state.text_prompt_ids(request.prompt)
        if kind == "prompt_token_ids":
            return list(request.prompt_token_ids.ids)
        if kind == "chat":
            if not request.chat.messages:
                raise InvalidRequest("chat.messages must not be empty", "chat.messages")
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            return self.state.chat_prompt_ids(messages)
        raise InvalidRequest("one of prompt, prompt_token_ids or chat is required", "input")

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


def _sampling_params(sampling: engine_pb2.SamplingParams, context_left: int) -> SamplingParams:
    given = {name: getattr(sampling, name) for name in _ENGINE_DEFAULTED if sampling.HasField(name)}
    return SamplingParams(
        max_tokens=sampling.max_tokens or context_left,
        temperature=sampling.temperature if sampling.HasField("temperature") else 0.0,
        top_k=sampling.top_k,
        stop=list(sampling.stop),
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
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """The server with its port bound (not started), its health servicer and the bound port."""
    interceptors = [_ApiKeyInterceptor(state)] if state.options.api_key else []
    server = grpc.aio.server(interceptors=interceptors)
    engine_pb2_grpc.add_EngineServicer_to_server(EngineService(state), server)
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
