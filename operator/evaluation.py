"""Evaluate a PromptVersion against its target LLMDeployment: render each dataset case with the
template, ask the deployment's OpenAI-compatible endpoint, check the answer's assertions."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any

from kvops.operator.api import Assertion, PromptVersionSpec
from kvops.operator.prompts import render_messages

REQUEST_TIMEOUT_S = 120.0
# Failures kept in status, so that one bad dataset cannot bloat the object.
MAX_FAILURES_REPORTED = 5


def chat_request(spec: PromptVersionSpec, model: str, inputs: dict[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": render_messages(spec, inputs)}
    parameters = spec.model_parameters
    for key, value in [
        ("temperature", parameters.temperature),
        ("top_p", parameters.top_p),
        ("max_tokens", parameters.max_tokens),
    ]:
        if value is not None:
            body[key] = value
    if parameters.stop:
        body["stop"] = parameters.stop
    return body


def failed_assertions(answer: str, expect: list[Assertion]) -> list[str]:
    """A description of every assertion the answer breaks (empty: it passed)."""
    failures = []
    for assertion in expect:
        if assertion.contains is not None and assertion.contains not in answer:
            failures.append(f"does not contain {assertion.contains!r}")
        if assertion.not_contains is not None and assertion.not_contains in answer:
            failures.append(f"contains {assertion.not_contains!r}")
        if assertion.regex is not None and not re.search(assertion.regex, answer):
            failures.append(f"does not match /{assertion.regex}/")
    return failures


def ask(base_url: str, body: dict[str, Any]) -> str:
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        return json.load(response)["choices"][0]["message"]["content"]


def evaluate(spec: PromptVersionSpec, base_url: str, model: str) -> dict[str, Any]:
    """Run the dataset; {passed, failed, failures}. Unreachable endpoints raise OSError."""
    assert spec.evaluation is not None
    passed, failures = 0, []
    for index, case in enumerate(spec.evaluation.dataset):
        answer = ask(base_url, chat_request(spec, model, case.inputs))
        broken = failed_assertions(answer, case.expect)
        if broken:
            failures.append(f"dataset[{index}]: {'; '.join(broken)}")
        else:
            passed += 1
    return {
        "passed": passed,
        "failed": len(failures),
        "failures": failures[:MAX_FAILURES_REPORTED],
    }


def endpoint_error(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} from the deployment"
    return f"{type(error).__name__}: {error}"
