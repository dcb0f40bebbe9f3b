"""Feedback pieces in this process: ratings, the bounded record of answered requests, the durable
log, and POST /v1/feedback's refusals over a fake engine (the real server: test_prompts_serve)."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient
from test_serve_inprocess import FakeAsyncEngine, serving_state

from kvops.worker.serve.feedback import (
    MAX_COMMENT_CHARS,
    AnsweredRequest,
    FeedbackLog,
    RecentRequests,
    parse_rating,
)
from kvops.worker.serve.http import create_app
from kvops.worker.serve.telemetry import PromptLabel


def test_ratings_are_thumbs_or_bounded_numbers():
    assert parse_rating("up").score == 1.0 and parse_rating("up").kind == "up"
    assert parse_rating("down").score == 0.0
    assert parse_rating(4).score == 4.0 and parse_rating(4).kind == "score"
    for bad in ("meh", -1, 10.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="score must be"):
            parse_rating(bad)


def test_recent_requests_forget_the_oldest_beyond_capacity():
    recent = RecentRequests(capacity=3)
    for i in range(5):
        recent.remember(f"id-{i}", AnsweredRequest("m", None, None))
    assert len(recent) == 3
    assert recent.get("id-1") is None and recent.get("id-2") is not None


def test_log_appends_whole_lines_and_ends_a_torn_one(tmp_path):
    path = tmp_path / "feedback.jsonl"
    path.write_text('{"request_id": "old"}\n{"request_id": "torn", "sc')  # killed mid-write
    log = FeedbackLog(path)
    answered = AnsweredRequest("m", PromptLabel("support", "2"), None)
    log.append("chatcmpl-1", answered, parse_rating("up"), "très bien")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == '{"request_id": "old"}'
    entry = json.loads(lines[2])
    assert entry["request_id"] == "chatcmpl-1" and entry["comment"] == "très bien"
    assert (entry["prompt_name"], entry["prompt_version"], entry["score"]) == ("support", "2", 1.0)
    assert entry["time"].endswith("+00:00")


@pytest.fixture
def client(tmp_path):
    state = serving_state(FakeAsyncEngine(), feedback_log=str(tmp_path / "feedback.jsonl"))
    with TestClient(create_app(state)) as client:
        yield client


def test_feedback_over_http_in_process(client, tmp_path):
    reply = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    request_id = reply.json()["id"]
    assert reply.json().get("prompt") is None

    rated = client.post("/v1/feedback", json={"request_id": request_id, "score": 0.5})
    assert rated.status_code == 200
    assert rated.json() == {
        "request_id": request_id,
        "model": "fake-model",
        "prompt": None,
        "score": 0.5,
        "rating": "score",
    }
    [line] = (tmp_path / "feedback.jsonl").read_text().splitlines()
    assert json.loads(line)["request_id"] == request_id

    refusals = [
        ({"request_id": "chatcmpl-unknown", "score": "up"}, 404, "no request 'chatcmpl-unknown'"),
        ({"request_id": request_id, "score": "meh"}, 400, 'score must be "up", "down"'),
        ({"request_id": request_id, "score": 11}, 400, "score must be from 0 to 10"),
        (
            {"request_id": request_id, "score": 1, "comment": "x" * (MAX_COMMENT_CHARS + 1)},
            400,
            "comment must be at most",
        ),
        ({"request_id": request_id}, 400, "score: Field required"),
        ({"request_id": request_id, "score": 1, "stars": 5}, 400, "stars: Extra inputs"),
    ]
    for body, status, message in refusals:
        response = client.post("/v1/feedback", json=body)
        assert response.status_code == status, body
        assert message in response.json()["error"]["message"]
    assert len((tmp_path / "feedback.jsonl").read_text().splitlines()) == 1

    empty = client.post("/v1/chat/completions", json={"messages": []})
    assert (
        empty.status_code == 400
        and "messages must not be empty" in empty.json()["error"]["message"]
    )


def test_worker_pods_log_feedback_to_their_emptydir():
    from kvops.operator import llmdeployment
    from kvops.operator.api import LLMDeploymentSpec

    spec = {"model": {"source": "builtin://smollm2"}}
    owner = {
        "apiVersion": "kvops.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": "chat", "namespace": "team", "uid": "u"},
        "spec": spec,
    }
    deployment = llmdeployment.render_deployment(owner, LLMDeploymentSpec.model_validate(spec))
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {var["name"]: var.get("value") for var in container["env"]}
    log = env["KVOPS_FEEDBACK_LOG"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "feedback"]
    assert log.startswith(mount["mountPath"] + "/") and not mount.get("readOnly")
    assert {"name": "feedback", "emptyDir": {}} in pod["volumes"]
