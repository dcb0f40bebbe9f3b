"""The OpenAI-compatible HTTP API of a real `kvops serve`, through the openai package and httpx."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from serve_process import engine_answer, metric_sum, wait_until_idle

from kvops.worker.serve.telemetry import METRIC_NAMES

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def client(default_server):
    return openai.OpenAI(base_url=f"{default_server.base_url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client, served_engine):
    [model] = client.models.list().data
    assert model.id == served_engine.model_name
    assert model.owned_by == "kvops"


def test_chat_equals_the_engine_streaming_or_not(client, served_engine):
    expected = engine_answer(served_engine, QUESTION, 24)
    model = served_engine.model_name

    reply = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=24, temperature=0
    )
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == 24 or reply.choices[0].finish_reason == "stop"

    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=QUESTION,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    finish = [reason for reason in finish if reason]
    assert finish == [reply.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_completions_with_logprobs_stop_and_n(client, served_engine):
    reply = client.completions.create(
        model=served_engine.model_name,
        prompt="The capital of France is",
        max_tokens=8,
        temperature=0,
        logprobs=3,
    )
    choice = reply.choices[0]
    assert len(choice.logprobs.tokens) == reply.usage.completion_tokens
    assert "".join(choice.logprobs.tokens) == choice.text
    for token, logprob, top in zip(
        choice.logprobs.tokens,
        choice.logprobs.token_logprobs,
        choice.logprobs.top_logprobs,
        strict=True,
    ):
        # Greedy picks the most likely token: it leads the alternatives.
        assert len(top) == 3 and logprob <= 0
        assert max(top.values()) == pytest.approx(logprob, abs=1e-4)
        assert token in top

    def sample():
        return client.completions.create(
            model=served_engine.model_name,
            prompt="Once upon a time",
            max_tokens=12,
            temperature=1.0,
            seed=7,
            n=3,
        )

    sampled, again = sample(), sample()
    texts = [c.text for c in sorted(sampled.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1, "choices of one request must differ"
    assert 3 <= sampled.usage.completion_tokens <= 3 * 12

    stopped = client.chat.completions.create(
        model=served_engine.model_name,
        messages=[{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
        max_tokens=64,
        temperature=0,
        stop=["5"],
    )
    assert "5" not in stopped.choices[0].message.content
    assert stopped.choices[0].finish_reason == "stop"


def test_chat_logprobs(client, served_engine):
    reply = client.chat.completions.create(
        model=served_engine.model_name,
        messages=QUESTION,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(item.token for item in content) == reply.choices[0].message.content
    assert all(len(item.top_logprobs) == 2 for item in content)


def test_64_concurrent_clients_get_their_own_answers(default_server, served_engine):
    prompts = [[{"role": "user", "content": f"Say the number {i} in words."}] for i in range(8)]
    expected = [engine_answer(served_engine, p, 12) for p in prompts]

    async def ask_all() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=f"{default_server.base_url}/v1", api_key="unused", max_retries=0
        ) as client:

            async def ask(messages):
                reply = await client.chat.completions.create(
                    model=served_engine.model_name, messages=messages, max_tokens=12, temperature=0
                )
                return reply.choices[0].message.content

            return await asyncio.gather(*(ask(prompts[i % 8]) for i in range(64)))

    answers = asyncio.run(asyncio.wait_for(ask_all(), 300))
    assert answers == [expected[i % 8] for i in range(64)]


def test_disconnecting_mid_stream_aborts_and_frees_the_cache(default_server, served_engine):
    before = wait_until_idle(default_server)
    body = {
        "model": served_engine.model_name,
        "messages": QUESTION,
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{default_server.base_url}/v1/chat/completions", json=body) as reply,
    ):
        received = 0
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                received += 1
            if received >= 3:
                break
    # Leaving the block closed the connection with the request far from done.
    after = wait_until_idle(default_server)
    assert metric_sum(after, "kvops_kv_cache_usage_ratio") == 0
    assert metric_sum(after, "kvops_num_requests_running") == 0
    assert metric_sum(after, "kvops_requests_total", outcome="aborted") == (
        metric_sum(before, "kvops_requests_total", outcome="aborted") + 1
    )


def test_disconnecting_a_non_streaming_request_aborts_it(default_server, served_engine):
    before = wait_until_idle(default_server)
    body = {
        "model": served_engine.model_name,
        "prompt": "Once upon a time",
        "max_tokens": 400,
        "ignore_eos": True,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{default_server.base_url}/v1/completions", json=body, timeout=1.5)
    after = wait_until_idle(default_server)
    assert metric_sum(after, "kvops_kv_cache_usage_ratio") == 0
    assert metric_sum(after, "kvops_requests_total", outcome="aborted") == (
        metric_sum(before, "kvops_requests_total", outcome="aborted") + 1
    )


LONG_PROMPT = "word " * 9000
HI = b'{"messages": [{"role": "user", "content": "hi"}]}'


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        (b'{"messages": [', 400, "malformed JSON"),
        (b"{}", 400, "messages"),
        (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "role"),
        (HI[:-1] + b', "max_tokens": -1}', 400, "max_tokens"),
        (HI[:-1] + b', "temperature": 3}', 400, "temperature"),
        (HI[:-1] + b', "n": 1000}', 400, "n"),
        (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "UTF-8"),
        (HI[:-1] + b', "model": "gpt-9"}', 404, "gpt-9"),
        (
            json.dumps({"messages": [{"role": "user", "content": LONG_PROMPT}]}).encode(),
            400,
            "max_model_len",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": "x" * 10_000_000}]}).encode(),
            400,
            "exceeds",
        ),
    ],
    ids=[
        "malformed-json",
        "missing-messages",
        "unknown-role",
        "negative-max-tokens",
        "temperature-out-of-range",
        "n-too-large",
        "invalid-utf8",
        "unknown-model",
        "prompt-longer-than-context",
        "10MB-body",
    ],
)
def test_bad_input_gets_a_clear_error_and_the_server_goes_on(default_server, body, status, names):
    url = f"{default_server.base_url}/v1/chat/completions"
    reply = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert names in error["message"], error
    assert error["type"] == "invalid_request_error"

    good = {"messages": QUESTION, "max_tokens": 2, "temperature": 0}
    assert httpx.post(url, json=good, timeout=60).status_code == 200


def test_unknown_paths_and_methods_get_openai_errors(default_server):
    missing = httpx.post(f"{default_server.base_url}/v1/embeddings/nope", json={})
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "invalid_request_error"
    wrong_method = httpx.get(f"{default_server.base_url}/v1/chat/completions")
    assert wrong_method.status_code == 405
    assert "error" in wrong_method.json()


def test_metrics_are_exposed_with_plausible_values(default_server, client, served_engine):
    client.chat.completions.create(
        model=served_engine.model_name, messages=QUESTION, max_tokens=4, temperature=0
    )
    samples = wait_until_idle(default_server)
    names = {name for name, _ in samples}
    for metric in METRIC_NAMES:
        assert metric in names or f"{metric}_count" in names, metric
    model = served_engine.model_name
    successes = metric_sum(samples, "kvops_requests_total", outcome="success", model=model)
    assert successes >= 1
    assert metric_sum(samples, "kvops_time_to_first_token_seconds_count") >= successes
    assert metric_sum(samples, "kvops_generation_tokens_total") >= 4
    assert metric_sum(samples, "kvops_prompt_tokens_total") > 0
    assert metric_sum(samples, "kvops_requests_total", outcome="invalid") >= 1
    assert 0 <= metric_sum(samples, "kvops_kv_cache_usage_ratio") <= 1
    assert metric_sum(samples, "kvops_prefix_cache_queries_total") >= metric_sum(
        samples, "kvops_prefix_cache_hits_total"
    )


def test_a_request_span_reaches_the_otlp_receiver(default_server, otlp_receiver, served_engine):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    reply = httpx.post(
        f"{default_server.base_url}/v1/chat/completions",
        json={"messages": QUESTION, "max_tokens": 3, "temperature": 0},
        headers={"traceparent": traceparent},
        timeout=60,
    )
    assert reply.status_code == 200
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        spans = [s for s in otlp_receiver.spans if s.trace_id == trace_id]
        if any(s.name.startswith("chat ") for s in spans):
            break
        time.sleep(0.2)
    [server_span] = [s for s in spans if s.name == f"chat {served_engine.model_name}"]
    assert server_span.parent_span_id == "00f067aa0ba902b7"
    attributes = server_span.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == served_engine.model_name
    assert attributes["gen_ai.request.max_tokens"] == 3
    assert attributes["gen_ai.usage.output_tokens"] == reply.json()["usage"]["completion_tokens"]
    assert attributes["gen_ai.usage.input_tokens"] == reply.json()["usage"]["prompt_tokens"]
    assert attributes["gen_ai.response.id"] == reply.json()["id"]
    assert server_span.resource["service.name"] == "kvops-test-worker"
    children = {s.name for s in spans if s.parent_span_id == server_span.span_id}
    assert {"queue", "prefill", "decode"} <= children
