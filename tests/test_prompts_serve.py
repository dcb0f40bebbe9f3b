"""Managed prompts and feedback on a real `kvops serve` (default model): requests by label get the
labelled version and follow a label move in the mounted prompts.json without a restart; metrics
and spans carry the version; rendering errors are clear 400s / INVALID_ARGUMENT; feedback is
counted, traced, logged, and its log survives a restart. Through the `openai` client, httpx and
the generated gRPC stubs; spans through the OTLP receiver."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from serve_process import ServeProcess, metric_sum, metrics

from kvops.v1 import engine_pb2, engine_pb2_grpc

pytestmark = pytest.mark.slow

QUESTION = "What colour is the sky?"
VERSIONS = {
    # Different messages and different maxTokens: the answer's length shows the version too.
    "1": ("You are a helpful assistant. Answer briefly.", 3),
    "2": ("You are a poet. Answer in rhyme.", 6),
}


def version_entry(number: str, template: list[dict], max_tokens: int = 8) -> dict:
    return {
        "promptVersion": f"support-v{number}",
        "version": number,
        "contentHash": f"sha256:{number * 64}"[:71],
        "template": template,
        "variables": [
            {"name": "question", "required": True, "default": None, "description": None},
            {"name": "tone", "required": False, "default": "plain", "description": None},
        ],
        "modelParameters": {"temperature": 0.0, "topP": None, "maxTokens": max_tokens, "stop": []},
    }


def prompts_json(production: str) -> dict:
    support = {
        number: version_entry(
            number,
            [{"role": "system", "content": system}, {"role": "user", "content": "{{ question }}"}],
            max_tokens,
        )
        for number, (system, max_tokens) in VERSIONS.items()
    }
    # What the operator would refuse, to show the worker refuses it too, clearly.
    broken = {
        name: version_entry(name, [{"role": "user", "content": content}])
        for name, content in [
            ("syntax", "{{ question }"),
            ("escape", "{{ ''.__class__.__mro__ }}"),
            ("huge", "{{ question * 1000000 }}"),
        ]
    }
    return {
        "prompts": {
            "support": {"labels": {"production": production}, "versions": support},
            "broken": {"labels": {}, "versions": broken},
        },
        "unresolved": [
            {
                "name": "support",
                "label": "canary",
                "reason": "no valid version lists the label canary",
            }
        ],
    }


def write_prompts(directory: Path, production: str) -> None:
    """As the kubelet does: the new file replaces the old one whole."""
    staged = directory / ".staged"
    staged.write_text(json.dumps(prompts_json(production)))
    os.replace(staged, directory / "prompts.json")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    (root / "prompts").mkdir()
    write_prompts(root / "prompts", production="1")
    return root / "prompts", root / "feedback.jsonl"


def prompts_server(folders, otlp_receiver) -> ServeProcess:
    """The server over these folders, not started yet (`with` starts and stops it)."""
    prompts_dir, feedback_log = folders
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    args = ("--prompts-dir", str(prompts_dir), "--feedback-log", str(feedback_log))
    return ServeProcess(*args, env=env)


@pytest.fixture(scope="module")
def server(folders, otlp_receiver):
    with prompts_server(folders, otlp_receiver) as server:  # the restart test may stop it first
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield engine_pb2_grpc.EngineStub(channel)


def ask(client, **prompt):
    prompt.setdefault("variables", {"question": QUESTION})
    return client.chat.completions.create(
        model=None, messages=[], temperature=0, extra_body={"prompt": {"name": "support", **prompt}}
    )


def server_span(receiver, response_id: str, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for span in receiver.spans:
            if span.kind == 2 and span.attributes.get("gen_ai.response.id") == response_id:
                return span
        time.sleep(0.1)
    raise TimeoutError(f"no server span for {response_id}")


def test_requests_by_label_follow_the_label_without_a_restart(
    server, client, folders, otlp_receiver
):
    by_label = ask(client, label="production")
    assert by_label.model_extra["prompt"] == {
        "name": "support",
        "version": "1",
        "hash": f"sha256:{'1' * 64}",
    }
    # maxTokens of version 1 applies; the request's own max_tokens would win.
    assert by_label.usage.completion_tokens == 3
    by_default = ask(client)  # neither version nor label: production
    assert by_default.model_extra["prompt"]["version"] == "1"
    assert by_default.choices[0].message.content == by_label.choices[0].message.content
    own_max = client.chat.completions.create(
        model=None,
        messages=[],
        max_tokens=2,
        extra_body={"prompt": {"name": "support", "variables": {"question": QUESTION}}},
    )
    assert own_max.usage.completion_tokens == 2

    write_prompts(folders[0], production="2")
    deadline = time.monotonic() + 15
    moved = ask(client, label="production")
    while moved.model_extra["prompt"]["version"] != "2" and time.monotonic() < deadline:
        time.sleep(0.3)
        moved = ask(client, label="production")
    assert moved.model_extra["prompt"]["version"] == "2", "the label move was not picked up"
    assert moved.usage.completion_tokens == 6
    assert moved.choices[0].message.content != by_label.choices[0].message.content
    pinned = ask(client, version="1")
    assert pinned.model_extra["prompt"]["version"] == "1"
    assert pinned.choices[0].message.content == by_label.choices[0].message.content

    samples = metrics(server)
    v1 = metric_sum(samples, "kvops_requests_total", prompt_name="support", prompt_version="1")
    v2 = metric_sum(samples, "kvops_requests_total", prompt_name="support", prompt_version="2")
    assert v2 >= 1 and v1 >= 4  # polling may add version-1 requests before the move shows
    assert (
        metric_sum(
            samples,
            "kvops_request_generation_tokens_sum",
            prompt_name="support",
            prompt_version="2",
        )
        == 6 * v2
    )
    for reply, expected in [(by_label, "1"), (moved, "2"), (pinned, "1")]:
        span = server_span(otlp_receiver, reply.id)
        assert span.attributes["gen_ai.prompt.name"] == "support"
        assert span.attributes["kvops.prompt.version"] == expected


def test_prompt_messages_come_first_and_streams_name_the_prompt(client, stub):
    rendered = stub.RenderPrompt(
        engine_pb2.RenderPromptRequest(
            prompt=engine_pb2.PromptReference(
                name="support", version="2", variables={"question": QUESTION}
            )
        )
    )
    assert [m.content for m in rendered.messages] == [VERSIONS["2"][0], QUESTION]
    assert rendered.prompt_used.version == "2"
    assert rendered.prompt_used.content_hash == f"sha256:{'2' * 64}"

    follow_up = {"role": "user", "content": "And at night?"}
    raw = [{"role": m.role, "content": m.content} for m in rendered.messages] + [follow_up]
    expected = client.chat.completions.create(model=None, messages=raw, max_tokens=6, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=None,
            messages=[follow_up],
            stream=True,
            extra_body={
                "prompt": {"name": "support", "version": "2", "variables": {"question": QUESTION}}
            },
        )
    )
    assert chunks[0].model_extra["prompt"]["version"] == "2"
    assert all("prompt" not in (c.model_extra or {}) for c in chunks[1:])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.choices[0].message.content

    generated = list(
        stub.Generate(
            engine_pb2.GenerateRequest(
                prompt_reference=engine_pb2.PromptReference(
                    name="support", version="2", variables={"question": QUESTION}
                ),
                chat=engine_pb2.ChatMessages(messages=[engine_pb2.ChatMessage(**follow_up)]),
            ),
            timeout=120,
        )
    )
    assert generated[0].prompt_used.name == "support" and generated[0].prompt_used.version == "2"
    assert "".join(r.text for r in generated) == expected.choices[0].message.content
    assert generated[-1].usage.completion_tokens == 6  # version 2's maxTokens


HTTP_REFUSALS = [
    ({"name": "sales"}, 404, "prompt 'sales' is not served here (prompts: broken, support)"),
    ({"name": "support", "version": "7"}, 404, "has no version '7' (versions: 1, 2)"),
    ({"name": "support", "label": "canary"}, 404, "no valid version lists the label canary"),
    (
        {"name": "support", "version": "1", "label": "production"},
        400,
        "a version or a label, not both",
    ),
    ({"name": "support", "variables": {}}, 400, "missing required variables: question"),
    (
        {"name": "support", "variables": {"question": "q", "colour": "red"}},
        400,
        "unknown variables: colour",
    ),
    ({"name": "support", "variables": {"question": 3}}, 400, "prompt.variables.question"),
    ({"name": "support", "lable": "canary"}, 400, "prompt.lable: Extra inputs are not permitted"),
    (
        {"name": "broken", "version": "syntax"},
        400,
        "template[0].content: template syntax error: line 1",
    ),
    (
        {"name": "broken", "version": "escape"},
        400,
        "refused by the template sandbox: access to attribute '__class__'",
    ),
    (
        {"name": "broken", "version": "huge"},
        400,
        "refused by the template sandbox: repeating a sequence",
    ),
]


@pytest.mark.parametrize(("prompt", "status", "message"), HTTP_REFUSALS)
def test_prompt_errors_are_clear_http_errors(server, prompt, status, message):
    body = {"messages": [], "prompt": {"variables": {"question": "q"}, **prompt}}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"]
    assert error["type"] == "invalid_request_error"
    assert "Traceback" not in response.text and ".py" not in response.text


def test_prompt_errors_are_grpc_status_codes(stub):
    def reference(**fields) -> engine_pb2.PromptReference:
        fields.setdefault("variables", {"question": "q"})
        return engine_pb2.PromptReference(**fields)

    cases = [
        (reference(name="sales"), grpc.StatusCode.NOT_FOUND, "not served here"),
        (reference(name="support", label="canary"), grpc.StatusCode.NOT_FOUND, "canary"),
        (
            reference(name="support", variables={}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "missing required variables: question",
        ),
        (reference(name="broken", version="escape"), grpc.StatusCode.INVALID_ARGUMENT, "sandbox"),
        (
            reference(name="broken", version="syntax"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "syntax error",
        ),
    ]

    def render(prompt: engine_pb2.PromptReference):
        return stub.RenderPrompt(engine_pb2.RenderPromptRequest(prompt=prompt))

    def generate(prompt: engine_pb2.PromptReference):
        return list(stub.Generate(engine_pb2.GenerateRequest(prompt_reference=prompt), timeout=60))

    for prompt, code, message in cases:
        for call in (render, generate):
            with pytest.raises(grpc.RpcError) as raised:
                call(prompt)
            assert raised.value.code() == code
            assert message in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        list(
            stub.Generate(
                engine_pb2.GenerateRequest(prompt="raw", prompt_reference=reference(name="support"))
            )
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt_reference takes chat messages or none" in raised.value.details()


def test_refusals_count_under_the_prompt_version(server, stub):
    def refused() -> float:
        return metric_sum(
            metrics(server),
            "kvops_requests_total",
            outcome="invalid",
            prompt_name="broken",
            prompt_version="escape",
        )

    before = refused()
    body = {"messages": [], "prompt": {"name": "broken", "version": "escape"}}
    assert httpx.post(f"{server.base_url}/v1/chat/completions", json=body).status_code == 400
    reference = engine_pb2.PromptReference(name="broken", version="escape")
    with pytest.raises(grpc.RpcError):
        stub.RenderPrompt(engine_pb2.RenderPromptRequest(prompt=reference))
    with pytest.raises(grpc.RpcError):
        list(stub.Generate(engine_pb2.GenerateRequest(prompt_reference=reference)))
    assert refused() == before + 3


def test_feedback_is_counted_traced_and_logged(server, client, stub, folders, otlp_receiver):
    reply = ask(client, version="2")
    rated = httpx.post(
        f"{server.base_url}/v1/feedback",
        json={"request_id": reply.id, "score": "up", "comment": "nice rhyme"},
    )
    assert rated.status_code == 200
    assert rated.json()["prompt"] == {"name": "support", "version": "2"}
    assert (
        httpx.post(
            f"{server.base_url}/v1/feedback", json={"request_id": reply.id, "score": 0.25}
        ).status_code
        == 200
    )
    unknown = httpx.post(
        f"{server.base_url}/v1/feedback", json={"request_id": "chatcmpl-nope", "score": "up"}
    )
    assert unknown.status_code == 404
    assert "no request 'chatcmpl-nope'" in unknown.json()["error"]["message"]

    generated = list(
        stub.Generate(
            engine_pb2.GenerateRequest(
                prompt_reference=engine_pb2.PromptReference(
                    name="support", version="1", variables={"question": QUESTION}
                )
            ),
            timeout=120,
        )
    )
    answer = stub.Feedback(
        engine_pb2.FeedbackRequest(request_id=generated[0].request_id, thumb="down")
    )
    assert (answer.prompt.version, answer.score) == ("1", 0.0)
    with pytest.raises(grpc.RpcError) as raised:
        stub.Feedback(engine_pb2.FeedbackRequest(request_id="gen-nope", score=3))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND

    samples = metrics(server)
    labels = {"prompt_name": "support", "prompt_version": "2"}
    assert metric_sum(samples, "kvops_feedback_total", rating="up", **labels) == 1
    assert metric_sum(samples, "kvops_feedback_total", rating="score", **labels) == 1
    assert metric_sum(samples, "kvops_feedback_score_sum", **labels) == 1.25
    assert metric_sum(samples, "kvops_feedback_total", rating="down", prompt_version="1") == 1

    request_span = server_span(otlp_receiver, reply.id)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        feedback_spans = [
            s
            for s in otlp_receiver.spans
            if s.name.startswith("feedback ") and s.attributes.get("gen_ai.response.id") == reply.id
        ]
        if len(feedback_spans) == 2:
            break
        time.sleep(0.1)
    assert len(feedback_spans) == 2
    for span in feedback_spans:
        assert (span.trace_id, span.parent_span_id) == (request_span.trace_id, request_span.span_id)
        assert span.attributes["kvops.prompt.version"] == "2"
        assert "nice rhyme" not in json.dumps(span.attributes)
    assert sorted(s.attributes["kvops.feedback.score"] for s in feedback_spans) == [0.25, 1.0]

    lines = [json.loads(line) for line in folders[1].read_text().splitlines()]
    assert [(e["request_id"], e["score"], e["rating"]) for e in lines] == [
        (reply.id, 1.0, "up"),
        (reply.id, 0.25, "score"),
        (generated[0].request_id, 0.0, "down"),
    ]
    assert lines[0]["comment"] == "nice rhyme" and lines[0]["prompt_version"] == "2"
    assert lines[2]["prompt_version"] == "1" and lines[0]["model"] == reply.model


def test_the_feedback_log_survives_a_restart(server, folders, otlp_receiver):
    """Last in this module: it stops the shared server."""
    log = folders[1]
    before = log.read_text()
    assert before.count("\n") >= 3
    server.stop()
    with prompts_server(folders, otlp_receiver) as restarted:
        client = openai.OpenAI(base_url=f"{restarted.base_url}/v1", api_key="unused", max_retries=0)
        reply = ask(client, version="1")
        rated = httpx.post(
            f"{restarted.base_url}/v1/feedback", json={"request_id": reply.id, "score": 9}
        )
        assert rated.status_code == 200
    after = log.read_text()
    assert after.startswith(before)
    [new] = after[len(before) :].splitlines()
    assert json.loads(new)["request_id"] == reply.id and json.loads(new)["score"] == 9
