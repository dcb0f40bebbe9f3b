"""The HTTP and gRPC servers in this process, over a fake AsyncLLMEngine: wire formats and the
mapping of every refusal onto status codes, with no model and no subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import grpc
import pytest
from starlette.testclient import TestClient

from kvops.v1 import engine_pb2, engine_pb2_grpc
from kvops.worker.request import EngineStats, Request, RequestOutput, RequestStatus, SamplingParams
from kvops.worker.serve import grpc as grpc_api
from kvops.worker.serve.http import create_app
from kvops.worker.serve.service import ServingOptions, ServingState
from kvops.worker.serve.telemetry import RequestTracer, ServingMetrics

MODEL = "fake-model"
API_KEY = "secret-key"


class FakeTokenizer:
    """One token per byte of UTF-8; a chat template that joins the contents."""

    has_chat_template = True
    eos_token_ids = frozenset()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode(errors="replace")

    def id_to_token(self, token_id: int) -> str:
        return self.decode([token_id])

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return "\n".join(m["content"] for m in messages)


class FakeAsyncEngine:
    """AsyncLLMEngine's public API, exactly: each request answers "a", "b", "c", ... one token
    per event-loop turn until max_tokens; with `hang` set, streams never produce anything."""

    tokenizer = FakeTokenizer()
    model_name = MODEL
    max_model_len = 64
    max_num_seqs = 2
    is_alive = True

    def __init__(self):
        self.hang = False
        self.made: list[Request] = []
        self.aborted: list[str] = []

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0.0, 0, 0, 0)

    def make_request(
        self, prompt=None, sampling_params=None, prompt_token_ids=None, request_id=None
    ) -> Request:
        params = sampling_params or SamplingParams()
        params.validate()
        if prompt_token_ids is None:
            prompt_token_ids = self.tokenizer.encode(prompt)
        if not prompt_token_ids:
            raise ValueError("prompt is empty")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens is {params.max_tokens}: more than the context")
        request = Request(request_id or f"req-{len(self.made)}", prompt_token_ids, params)
        self.made.append(request)
        return request

    def generate(self, prompt=None, sampling_params=None, prompt_token_ids=None, request_id=None):
        return self.stream(self.make_request(prompt, sampling_params, prompt_token_ids, request_id))

    async def stream(self, request: Request) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while self.hang:
                await asyncio.sleep(0.01)
            max_tokens = request.sampling_params.max_tokens
            for i in range(max_tokens):
                await asyncio.sleep(0)
                token = ord("a") + i % 26
                request.output_token_ids.append(token)
                finished = i == max_tokens - 1
                if finished:
                    request.status = RequestStatus.FINISHED_LENGTH
                yield RequestOutput(
                    request_id=request.request_id,
                    prompt_token_ids=request.prompt_token_ids,
                    token_ids=list(request.output_token_ids),
                    text=bytes(request.output_token_ids).decode(),
                    new_token_ids=[token],
                    new_text=chr(token),
                    finished=finished,
                    finish_reason=request.status.finish_reason,
                )
        finally:
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        self.is_alive = False


def serving_state(engine: FakeAsyncEngine, **options) -> ServingState:
    return ServingState(
        engine,
        ServingOptions(served_model_name=MODEL, **options),
        ServingMetrics(MODEL, engine.stats),
        RequestTracer(None),
    )


# ------------------------------------------------------------------------------------ HTTP


@pytest.fixture
def engine() -> FakeAsyncEngine:
    return FakeAsyncEngine()


@pytest.fixture
def state(engine) -> ServingState:
    return serving_state(engine, max_queue=1)


@pytest.fixture
def client(state) -> TestClient:
    with TestClient(create_app(state)) as client:
        yield client


def completion(client: TestClient, headers: dict | None = None, **body):
    return client.post("/v1/completions", json={"prompt": "hi", **body}, headers=headers)


def events(response) -> list[str]:
    """The data of each server-sent event, checking the framing on the way."""
    text = response.text
    assert text.endswith("\n\n")
    frames = text[:-2].split("\n\n")
    assert all(frame.startswith("data: ") for frame in frames), frames
    return [frame.removeprefix("data: ") for frame in frames]


def test_completion_counts_the_engines_tokens(client, engine):
    response = completion(client, max_tokens=3)
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == MODEL and body["object"] == "text_completion"
    assert body["choices"] == [
        {"index": 0, "text": "abc", "logprobs": None, "finish_reason": "length"}
    ]
    assert body["usage"]["prompt_tokens"] == 2 and body["usage"]["completion_tokens"] == 3
    assert len(engine.made) == 1, "a request is validated once, by make_request"


def test_n_choices_are_n_engine_requests(client, engine):
    body = completion(client, max_tokens=2, n=3, seed=7).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 6
    assert [r.sampling_params.seed for r in engine.made] == [7, 8, 9]
    assert len({r.request_id for r in engine.made}) == 3


def test_defaults_are_the_engines(client, engine):
    completion(client)
    assert engine.made[0].sampling_params == SamplingParams()


def test_stream_is_server_sent_events_ending_in_done(client):
    response = completion(client, max_tokens=3, n=2, stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    data = events(response)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    for index in (0, 1):
        choices = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in choices) == "abc"
        assert [c["finish_reason"] for c in choices] == [None, None, "length"]


def test_chat_stream_with_usage(client):
    response = client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hello"}],
            "max_completion_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    data = events(response)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1])
    assert content == "ab"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == 5
    assert usage_chunk["usage"]["completion_tokens"] == 2


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_400_names_the_field(client):
    error = error_of(completion(client, temperature=5), 400)
    assert error["param"] == "temperature" and error["type"] == "invalid_request_error"
    # What only the engine knows (the context length) is a 400 as well, before any stream.
    error = error_of(completion(client, max_tokens=100, stream=True), 400)
    assert "max_tokens" in error["message"]


def test_a_model_without_a_tokenizer_takes_token_ids_only(client, engine):
    engine.tokenizer = None
    error = error_of(completion(client), 400)
    assert error["param"] == "prompt" and "no tokenizer" in error["message"]
    assert completion(client, prompt=[1, 2], max_tokens=1).json()["choices"][0]["text"] == "a"


def test_404_for_an_unknown_model(client):
    error = error_of(completion(client, model="another"), 404)
    assert error["param"] == "model" and "another" in error["message"]


def test_401_without_the_api_key(engine):
    with TestClient(create_app(serving_state(engine, api_key=API_KEY))) as client:
        error_of(completion(client), 401)
        error_of(completion(client, headers={"Authorization": "Bearer wrong"}), 401)
        ok = completion(client, headers={"Authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200  # probes stay open


def test_429_with_retry_after_when_the_queue_is_full(client, state):
    with state.admit(state.capacity):
        response = completion(client)
    error_of(response, 429)
    assert response.headers["Retry-After"] == "1"
    assert completion(client).status_code == 200


def test_503_while_draining(client, state):
    state.draining = True
    response = completion(client)
    error_of(response, 503)
    assert response.headers["Retry-After"]
    assert client.get("/ready").status_code == 503


def test_504_on_a_deadline_aborts_the_request(client, engine):
    engine.hang = True
    error = error_of(completion(client, headers={"X-Request-Timeout": "0.05"}), 504)
    assert error["type"] == "timeout_error"
    assert engine.aborted == [engine.made[0].request_id]


# ------------------------------------------------------------------------------------ gRPC


@contextlib.asynccontextmanager
async def grpc_stub(state: ServingState):
    server, _, port = grpc_api.create_server(state, "127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield engine_pb2_grpc.EngineStub(channel)
    finally:
        await server.stop(None)


def generate_request(**fields) -> engine_pb2.GenerateRequest:
    sampling = engine_pb2.SamplingParams(**fields.pop("sampling", {"max_tokens": 3}))
    return engine_pb2.GenerateRequest(sampling=sampling, **{"prompt": "hi", **fields})


async def collect(stub, request, metadata=None) -> list[engine_pb2.GenerateResponse]:
    return [response async for response in stub.Generate(request, metadata=metadata)]


def run_grpc(state: ServingState, body):
    async def main():
        async with grpc_stub(state) as stub:
            return await body(stub)

    return asyncio.run(main())


def test_grpc_generate_streams_and_reports_usage(engine):
    responses = run_grpc(serving_state(engine), lambda stub: collect(stub, generate_request()))
    assert "".join(r.text for r in responses) == "abc"
    assert [r.finish_reason for r in responses] == ["", "", "length"]
    assert responses[-1].usage.completion_tokens == 3
    assert responses[-1].usage.prompt_tokens == 2


def test_grpc_unset_fields_mean_greedy_and_the_engines_defaults(engine):
    run_grpc(serving_state(engine), lambda stub: collect(stub, generate_request(sampling={})))
    params = engine.made[0].sampling_params
    assert params.temperature == 0.0  # engine.proto: unset temperature is greedy
    assert params.max_tokens == engine.max_model_len - 2  # the rest of the context
    default = SamplingParams()
    assert (params.top_p, params.seed, params.logprobs) == (
        default.top_p,
        default.seed,
        default.logprobs,
    )


def grpc_error(state: ServingState, request, metadata=None) -> grpc.aio.AioRpcError:
    async def body(stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(stub, request, metadata)
        return caught.value

    return run_grpc(state, body)


@pytest.mark.parametrize(
    ("request_fields", "code", "detail"),
    [
        ({"sampling": {"temperature": -1}}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        ({"sampling": {"max_tokens": 100}}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({"model": "another"}, grpc.StatusCode.NOT_FOUND, "another"),
    ],
)
def test_grpc_refusals(engine, request_fields, code, detail):
    error = grpc_error(serving_state(engine), generate_request(**request_fields))
    assert error.code() == code and detail in error.details()


def test_grpc_unauthenticated_without_the_api_key(engine):
    state = serving_state(engine, api_key=API_KEY)
    assert grpc_error(state, generate_request()).code() == grpc.StatusCode.UNAUTHENTICATED
    wrong = (("authorization", "Bearer wrong"),)
    assert grpc_error(state, generate_request(), wrong).code() == grpc.StatusCode.UNAUTHENTICATED
    right = (("authorization", f"Bearer {API_KEY}"),)
    responses = run_grpc(state, lambda stub: collect(stub, generate_request(), right))
    assert responses[-1].finish_reason == "length"


def test_grpc_resource_exhausted_with_retry_after_when_the_queue_is_full(engine):
    state = serving_state(engine, max_queue=0)
    with state.admit(state.capacity):
        error = grpc_error(state, generate_request())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after-ms", "1000") in tuple(error.trailing_metadata())


def test_grpc_unavailable_while_draining(engine):
    state = serving_state(engine)
    state.draining = True
    assert grpc_error(state, generate_request()).code() == grpc.StatusCode.UNAVAILABLE


def test_grpc_deadline_exceeded_aborts_the_request(engine):
    engine.hang = True
    error = grpc_error(serving_state(engine, request_timeout=0.05), generate_request())
    # The server's own deadline (the client set none), so the message is the server's.
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not finish within" in error.details()
    assert engine.aborted == [engine.made[0].request_id]
