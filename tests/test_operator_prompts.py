"""PromptVersions without a cluster: which version holds a label and why the others do not, the
prompt ConfigMap the worker reads, the evaluation Job, and `kvops eval` (its assertions, its
summary, and a run against a real `kvops serve`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from pydantic import ValidationError

from kvops.operator import contract, evaluation, llmdeployment, prompts, promptversion
from kvops.operator.api import Assertion, LLMDeploymentSpec, PromptVersionSpec


def pver(
    name: str,
    labels=(),
    created: str = "2026-01-01T00:00:00Z",
    content: str = "{{ question }}",
    prompt: str = "faq",
    version: str | None = None,
    gate: float | None = None,
    last: dict | None = None,
    deleting: bool = False,
    conditions: list | None = None,
) -> dict:
    """A PromptVersion object as the API server returns it (uid = name)."""
    spec = {
        "promptName": prompt,
        "version": version or name.rsplit("-", 1)[-1],
        "template": [{"role": "user", "content": content}],
        "variables": [{"name": "question"}],
        "labels": list(labels),
    }
    if gate is not None:
        spec["evaluation"] = {
            "llmDeployment": "chat",
            "dataset": [{"inputs": {"question": "Hi?"}, "expect": [{"contains": "Hello"}]}],
            "gate": {"minPassRate": gate},
        }
    metadata = {"name": name, "namespace": "team", "uid": name, "creationTimestamp": created}
    if deleting:
        metadata["deletionTimestamp"] = "2026-02-01T00:00:00Z"
    status: dict = {"conditions": conditions or []}
    if last is not None:
        status["lastEvaluation"] = last
    return {
        "apiVersion": "kvops.io/v1alpha1",
        "kind": "PromptVersion",
        "metadata": metadata,
        "spec": spec,
        "status": status,
    }


def passed(version: dict, rate: float) -> dict:
    """`version` with a last evaluation of its current content at this pass rate."""
    spec = PromptVersionSpec.model_validate(version["spec"])
    version["status"]["lastEvaluation"] = {
        "contentHash": prompts.content_hash(spec),
        "passRate": rate,
        "passed": 1,
        "failed": 1,
    }
    return version


def holder(versions, label="production", prompt="faq"):
    found = prompts.holder_of_label(versions, prompt, label)
    return None if found is None else found["metadata"]["name"]


# ------------------------------------------------------------------------------------------ labels


def test_the_newest_valid_version_holds_a_label_and_an_invalid_one_never_does():
    v1 = pver("faq-v1", ["production"], "2026-01-01T00:00:00Z")
    v2 = pver("faq-v2", ["production", "canary"], "2026-01-02T00:00:00Z")
    broken = pver("faq-v3", ["production"], "2026-01-03T00:00:00Z", content="{{ question }")
    versions = [v2, broken, v1]
    assert holder(versions) == "faq-v2"
    assert holder(versions, "canary") == "faq-v2"
    assert holder(versions, "staging") is None
    assert holder(versions, prompt="other") is None
    assert prompts.label_report(v1, versions) == (
        [],
        [{"label": "production", "reason": "production is held by faq-v2 (newer)"}],
    )
    held, not_held = prompts.label_report(broken, versions)
    assert held == []
    [reason] = not_held
    assert reason["label"] == "production"
    assert reason["reason"].startswith("invalid template: template[0].content: line 1:")
    assert prompts.label_report(v2, versions) == (["production", "canary"], [])
    # Without v2 the label falls back to v1, never to the newer broken version.
    assert holder([v1, broken]) == "faq-v1"
    # A version being deleted lets go at once.
    assert holder([v1, pver("faq-v2", ["production"], "2026-01-02T00:00:00Z", deleting=True)]) == (
        "faq-v1"
    )


def test_a_second_object_for_the_same_version_is_refused():
    first = pver("faq-one", ["production"], "2026-01-01T00:00:00Z", version="1")
    copy = pver("faq-copy", ["production"], "2026-01-02T00:00:00Z", version="1")
    assert holder([first, copy]) == "faq-one"
    assert prompts.label_report(copy, [first, copy])[1] == [
        {"label": "production", "reason": "version 1 of faq is already faq-one"}
    ]


def test_a_gated_version_holds_labels_only_after_its_evaluation_passed():
    v1 = pver("faq-v1", ["production"])
    v2 = pver("faq-v2", ["production"], "2026-01-02T00:00:00Z", gate=0.8)
    assert holder([v1, v2]) == "faq-v1"
    assert prompts.label_report(v2, [v1, v2])[1] == [
        {"label": "production", "reason": "waiting for evaluation"}
    ]
    v2["status"]["conditions"] = [
        {
            "type": "Evaluated",
            "status": "False",
            "reason": "WaitingForDeployment",
            "message": "LLMDeployment chat is not Available (phase Progressing)",
        }
    ]
    assert prompts.label_report(v2, [v1, v2])[1][0]["reason"] == (
        "waiting for evaluation: LLMDeployment chat is not Available (phase Progressing)"
    )
    passed(v2, 0.5)
    assert holder([v1, v2]) == "faq-v1"
    assert prompts.label_report(v2, [v1, v2])[1] == [
        {"label": "production", "reason": "evaluation pass rate 0.5 < 0.8"}
    ]
    passed(v2, 0.8)
    assert holder([v1, v2]) == "faq-v2"
    # A result for other content (the status of an object re-created with another template)
    # does not count.
    v2["status"]["lastEvaluation"]["contentHash"] = "sha256:other"
    assert holder([v1, v2]) == "faq-v1"


def test_users_are_the_deployments_whose_label_resolves_to_the_version():
    v1 = pver("faq-v1", ["production"])
    v2 = pver("faq-v2", ["canary"], "2026-01-02T00:00:00Z")
    deployments = [
        {"metadata": {"name": "bot"}, "spec": {"prompts": [{"name": "faq"}]}},
        {"metadata": {"name": "beta"}, "spec": {"prompts": [{"name": "faq", "label": "canary"}]}},
        {"metadata": {"name": "other"}, "spec": {}},
    ]
    assert prompts.users_of(v1, [v1, v2], deployments) == ["bot"]
    assert prompts.users_of(v2, [v1, v2], deployments) == ["beta"]


# ------------------------------------------------------------------------- the prompt ConfigMap

LLMD = {"model": {"source": "builtin://smollm2"}, "gpus": 0}


def config_map(refs: list[dict], versions: list[dict]) -> dict:
    spec = {**LLMD, "prompts": refs}
    owner = {
        "apiVersion": "kvops.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": "bot", "namespace": "team", "uid": "uid-bot"},
        "spec": spec,
    }
    children, _ = llmdeployment.render(owner, LLMDeploymentSpec.model_validate(spec), versions)
    [cm] = [c for c in children if c["kind"] == "ConfigMap"]
    assert cm["metadata"]["name"] == "bot-prompts"
    assert list(cm["data"]) == ["prompts.json"]
    return json.loads(cm["data"]["prompts.json"])


def test_the_config_map_holds_every_servable_version_and_the_labels_held_now():
    v1 = pver("faq-v1", ["production"])
    v2 = pver("faq-v2", ["production"], "2026-01-02T00:00:00Z", gate=0.8)
    broken = pver("faq-v3", ["canary"], "2026-01-03T00:00:00Z", content="{{ question }")
    content = config_map(
        [{"name": "faq"}, {"name": "faq", "label": "canary"}, {"name": "missing"}],
        [v1, v2, broken, pver("other-v1", ["production"], prompt="other")],
    )
    faq = content["prompts"]["faq"]
    assert faq["labels"] == {"production": "v1"}
    # The gated version may still be asked for by version; the broken one is not served.
    assert sorted(faq["versions"]) == ["v1", "v2"]
    assert faq["versions"]["v1"] == {
        "promptVersion": "faq-v1",
        "version": "v1",
        "contentHash": prompts.content_hash(PromptVersionSpec.model_validate(v1["spec"])),
        "template": [{"role": "user", "content": "{{ question }}"}],
        "variables": [{"name": "question", "required": True, "default": None, "description": None}],
        "modelParameters": {"temperature": None, "topP": None, "maxTokens": None, "stop": []},
    }
    assert content["prompts"]["missing"] == {"labels": {}, "versions": {}}
    canary, missing = content["unresolved"]
    assert canary["name"] == "faq" and canary["label"] == "canary"
    assert canary["reason"].startswith("no version that lists canary may hold it (faq-v3: invalid")
    assert missing == {
        "name": "missing",
        "label": "production",
        "reason": "no PromptVersion of this prompt exists",
    }
    # Rendering is deterministic: the same versions give the same bytes (no needless rollouts).
    assert config_map([{"name": "faq"}], [v2, v1]) == config_map([{"name": "faq"}], [v1, v2])


def test_the_config_map_is_bounded_but_keeps_the_label_holders():
    old = pver("faq-v0", ["production"], "2025-01-01T00:00:00Z")
    newer = [
        pver(f"faq-v{i}", [], f"2026-01-01T00:00:{i:02d}Z")
        for i in range(1, prompts.MAX_SERVED_VERSIONS + 5)
    ]
    faq = config_map([{"name": "faq"}], [old, *newer])["prompts"]["faq"]
    assert len(faq["versions"]) == prompts.MAX_SERVED_VERSIONS + 1
    assert faq["labels"] == {"production": "v0"} and "v0" in faq["versions"]
    assert "v1" not in faq["versions"]  # the oldest unlabelled ones go first


# -------------------------------------------------------------------------- the evaluation Job


def evaluated(name="faq-v2", dataset=None, **extra) -> dict:
    version = pver(name, ["production"], gate=0.8)
    if dataset is not None:
        version["spec"]["evaluation"]["dataset"] = dataset
    version["spec"].update(extra)
    return version


TARGET = LLMDeploymentSpec.model_validate(
    {
        **LLMD,
        "model": {"source": "builtin://smollm2", "servedName": "chat-model"},
        "image": "registry.example/kvops-worker:9",
        "imagePullSecrets": [{"name": "registry"}],
        "env": [{"name": "KVOPS_API_KEY", "secretKeyRef": {"name": "chat-key", "key": "key"}}],
    }
)


def job_for(version: dict) -> dict:
    spec = PromptVersionSpec.model_validate(version["spec"])
    return promptversion.render_eval_job(version, spec, "chat", TARGET, "http://chat.team.svc:8000")


def test_the_evaluation_job_runs_kvops_eval_in_the_targets_image_under_restricted_security():
    version = evaluated()
    job = job_for(version)
    assert contract.children_problem([job]) is None
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "registry.example/kvops-worker:9"
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert container["args"][:2] == ["eval", "/etc/kvops/eval/promptversion.yaml"]
    args = container["args"]
    assert args[args.index("--endpoint") + 1] == "http://chat.team.svc:8000"
    assert args[args.index("--model") + 1] == "chat-model"
    assert args[args.index("--termination-log") + 1] == container["terminationMessagePath"]
    assert container["env"] == [
        {
            "name": "KVOPS_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": "chat-key", "key": "key", "optional": False}},
        }
    ]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "promptversion", "configMap": {"name": job["metadata"]["name"]}} in pod[
        "volumes"
    ]
    assert job["metadata"]["ownerReferences"][0]["uid"] == "faq-v2"


def test_the_job_is_named_after_content_and_evaluation_only():
    version = evaluated()
    name = job_for(version)["metadata"]["name"]
    assert name.startswith("faq-v2-eval-") and len(name) <= 63
    relabelled = evaluated()
    relabelled["spec"]["labels"] = ["canary"]
    assert job_for(relabelled)["metadata"]["name"] == name
    redone = evaluated(dataset=[{"inputs": {"question": "Bye?"}, "expect": [{"regex": "."}]}])
    assert job_for(redone)["metadata"]["name"] != name
    long_a, long_b = evaluated("x" * 200 + "-a"), evaluated("x" * 200 + "-b")
    names = {job_for(v)["metadata"]["name"] for v in (long_a, long_b)}
    assert len(names) == 2 and all(len(n) <= 63 for n in names)


def test_the_job_command_reads_the_config_map_with_the_real_cli(tmp_path):
    """The Job's exact command line, with the ConfigMap's file, against a closed port: the CLI
    parses both and reports the unreachable endpoint as an error, not as failed cases."""
    version = evaluated()
    spec = PromptVersionSpec.model_validate(version["spec"])
    data = promptversion.render_eval_config_map(version, spec)["data"]
    (tmp_path / "promptversion.yaml").write_text(data["promptversion.yaml"])
    args = job_for(version)["spec"]["template"]["spec"]["containers"][0]["args"]
    args = [a.replace("/etc/kvops/eval", str(tmp_path)) for a in args]
    args[args.index("--endpoint") + 1] = f"http://127.0.0.1:{closed_port()}"
    args[args.index("--termination-log") + 1] = str(tmp_path / "termination-log")
    result = kvops(*args)
    assert result.returncode == 1, result.stderr
    assert "the endpoint failed, nothing was evaluated" in result.stderr
    error = json.loads((tmp_path / "termination-log").read_text())["error"]
    assert "Connection refused" in error
    name, loaded = evaluation.load_promptversion(tmp_path / "promptversion.yaml")
    assert name == "faq-v2" and prompts.content_hash(loaded) == prompts.content_hash(spec)


def finished_pod(exit_code: int, message: str) -> dict:
    terminated = {"exitCode": exit_code, "message": message, "reason": "Completed"}
    return {
        "status": {"containerStatuses": [{"name": "eval", "state": {"terminated": terminated}}]}
    }


def job_with(condition: str | None) -> dict:
    conditions = [{"type": condition, "status": "True"}] if condition else []
    status = {"conditions": conditions, "completionTime": "2026-03-01T10:00:00Z"}
    return {"metadata": {"name": "faq-v2-eval-abc"}, "status": status}


def test_the_job_outcome_comes_from_the_termination_message():
    summary = {"contentHash": "sha256:x", "passRate": 0.5, "passed": 1, "failed": 1, "failures": []}
    pod = finished_pod(0, json.dumps(summary))
    state, outcome = promptversion.evaluation_outcome(job_with("Complete"), [pod])
    assert (state, outcome) == ("done", summary)
    result = promptversion.evaluation_result(job_with("Complete"), summary, "chat", "sha256:x")
    assert result == {
        "time": "2026-03-01T10:00:00Z",
        "target": "chat",
        "contentHash": "sha256:x",
        "job": "faq-v2-eval-abc",
        "passRate": 0.5,
        "passed": 1,
        "failed": 1,
        "failures": [],
    }
    failed = finished_pod(1, json.dumps({"error": "http://chat:8000: connection refused"}))
    assert promptversion.evaluation_outcome(job_with("Failed"), [failed]) == (
        "failed",
        "the evaluation Job faq-v2-eval-abc failed: http://chat:8000: connection refused",
    )
    assert promptversion.evaluation_outcome(job_with(None), [])[0] == "running"
    assert promptversion.evaluation_outcome(job_with("Complete"), [])[0] == "failed"


# ------------------------------------------------------------------------------ the assertions


def check(answer: str, latency_ms: float = 10.0, tokens: int | None = 5, **assertion) -> list:
    return evaluation.failed_assertions(answer, [Assertion(**assertion)], latency_ms, tokens)


def test_every_kind_of_assertion():
    assert check(" Paris\n", equals="Paris") == []
    assert check("Paris.", equals="Paris") == ["does not equal 'Paris'"]
    assert check("Paris is big", contains="Paris") == []
    assert check("London", contains="Paris") == ["does not contain 'Paris'"]
    assert check("London", not_contains="London") == ["contains 'London'"]
    assert check("Paris is", regex=r"^\w+ is") == []
    assert check("is Paris", regex=r"^\w+ is") == ["does not match /^\\w+ is/"]
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    }
    assert check('{"city": "Paris"}', json_schema=schema) == []
    assert check('{"city": 3}', json_schema=schema) == [
        "does not match the JSON Schema at ['city']: 3 is not of type 'string'"
    ]
    [not_json] = check("city: Paris", json_schema=schema)
    assert not_json.startswith("is not JSON: Expecting value")
    assert check("x", latency_ms=250.0, max_latency_ms=300) == []
    assert check("x", latency_ms=350.0, max_latency_ms=300) == ["took 350 ms > 300 ms"]
    assert check("x", tokens=8, max_tokens=8) == []
    assert check("x", tokens=9, max_tokens=8) == ["used 9 completion tokens > 8"]
    assert "no usage.completion_tokens" in check("x", tokens=None, max_tokens=8)[0]


def test_assertions_are_checked_when_the_spec_is_read():
    with pytest.raises(ValidationError, match="exactly one of equals, contains"):
        Assertion(contains="a", regex="b")
    with pytest.raises(ValidationError, match="exactly one of"):
        Assertion()
    with pytest.raises(ValidationError, match="regex '\\(': missing \\), unterminated"):
        Assertion(regex="(")
    with pytest.raises(ValidationError, match="not a valid JSON Schema: 'strin' is not valid"):
        Assertion(json_schema={"type": "strin"})
    with pytest.raises(ValidationError, match="minPassRate"):
        PromptVersionSpec.model_validate(
            {
                **evaluated()["spec"],
                "evaluation": {**evaluated()["spec"]["evaluation"], "gate": {"minPassRate": 1.5}},
            }
        )


def test_the_summary_fits_a_termination_message():
    cases = [
        {"index": i, "passed": False, "failures": ["does not contain " + "x" * 5000]}
        for i in range(50)
    ]
    report = {"contentHash": "sha256:x", "passRate": 0.0, "passed": 0, "failed": 50, "cases": cases}
    text = evaluation.summary(report)
    assert len(text.encode()) <= 4000
    summary = json.loads(text)
    assert summary["failed"] == 50 and summary["passRate"] == 0.0
    assert 1 <= len(summary["failures"]) <= evaluation.MAX_FAILURES_REPORTED
    assert summary["failures"][0].startswith("dataset[0]: does not contain xxx")


def test_kvops_eval_refuses_a_file_that_is_not_an_evaluated_prompt_version(tmp_path):
    path = tmp_path / "pv.yaml"
    path.write_text(yaml.safe_dump({"kind": "LLMDeployment", "spec": {}}))
    result = kvops("eval", str(path), "--endpoint", "http://127.0.0.1:1")
    assert result.returncode == 2 and "not a PromptVersion manifest" in result.stderr
    version = pver("faq-v1")
    path.write_text(yaml.safe_dump(version))
    result = kvops("eval", str(path), "--endpoint", "http://127.0.0.1:1")
    assert result.returncode == 2 and "has no spec.evaluation to run" in result.stderr


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kvops(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvops.worker.serve.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


# ---------------------------------------------------------------- against a real kvops serve


@pytest.mark.slow
def test_kvops_eval_against_kvops_serve_reports_the_exact_pass_rate(tmp_path):
    """Three cases through the built-in model, one built to fail (a string the model never
    says): the pass rate is exactly 2/3 and the report carries latency and token counts."""
    from serve_process import ServeProcess

    question = {"question": "What is the capital of France?"}
    version = {
        "apiVersion": "kvops.io/v1alpha1",
        "kind": "PromptVersion",
        "metadata": {"name": "capitals-v1"},
        "spec": {
            "promptName": "capitals",
            "version": "1",
            "template": [
                {"role": "system", "content": "Answer in one short sentence."},
                {"role": "user", "content": "{{ question }}"},
            ],
            "variables": [{"name": "question"}],
            "modelParameters": {"temperature": 0, "maxTokens": 12},
            "evaluation": {
                "llmDeployment": "evalbot",
                "dataset": [
                    {"inputs": question, "expect": [{"regex": "\\S"}, {"maxTokens": 12}]},
                    {"inputs": question, "expect": [{"contains": "zzzz-never-said"}]},
                    {
                        "inputs": question,
                        "expect": [{"notContains": "zzzz-never-said"}, {"maxLatencyMs": 60000}],
                    },
                ],
            },
        },
    }
    path = tmp_path / "capitals.yaml"
    path.write_text(yaml.safe_dump(version))
    with ServeProcess("--served-model-name", "evalbot", "--device", "cpu") as server:
        result = kvops(
            "eval",
            str(path),
            "--endpoint",
            server.base_url,
            "--report",
            str(tmp_path / "report.json"),
            "--termination-log",
            str(tmp_path / "termination-log"),
        )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["passed"], report["failed"]) == (2, 1)
    assert report["passRate"] == pytest.approx(2 / 3)
    assert [case["passed"] for case in report["cases"]] == [True, False, True]
    assert report["cases"][1]["failures"] == ["does not contain 'zzzz-never-said'"]
    for case in report["cases"]:
        assert 0 < case["latencyMs"] < 60000
        assert 1 <= case["completionTokens"] <= 12 and case["promptTokens"] > 10
        assert case["answer"]
    # Greedy decoding: the three identical questions got the same answer.
    assert len({case["answer"] for case in report["cases"]}) == 1
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["failures"] == ["dataset[1]: does not contain 'zzzz-never-said'"]
    assert summary["contentHash"] == report["contentHash"]
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["case", "result", "latency", "ms", "tokens", "detail"]
    assert lines[2].split()[:2] == ["1", "FAIL"]
    assert lines[-1] == "pass rate 0.667 (2 of 3 passed)"
