"""`kvops eval`: run a PromptVersion's evaluation dataset through an OpenAI-compatible endpoint.

Each case is rendered with the shared prompt renderer, sent to /v1/chat/completions with the
version's model parameters, and checked against its assertions. The result is a table on stdout,
a JSON report (--report) and, for the operator's evaluation Job, a short JSON summary in the
container's termination message (--termination-log), which the operator copies into the
PromptVersion's status. An unreachable or failing endpoint stops the run (exit 1): it says
nothing about the prompt, so it must not count as failed cases.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from kvops.operator.api import Assertion, PromptVersionSpec
from kvops.operator.prompts import content_hash, render_messages

REQUEST_TIMEOUT_S = 120.0
# Failed cases kept in the summary (and the PromptVersion's status): one bad dataset must not
# bloat the object.
MAX_FAILURES_REPORTED = 5
# The kubelet keeps at most 4096 bytes of a termination message; leave room to spare.
MAX_TERMINATION_MESSAGE_BYTES = 4000
# Where the worker's API key comes from, as for `kvops serve` (never printed).
API_KEY_ENV = "KVOPS_API_KEY"


class EndpointError(Exception):
    """The endpoint cannot be reached or fails on its side (5xx): the run stops."""


@dataclass
class CaseResult:
    index: int
    inputs: dict[str, str]
    failures: list[str] = field(default_factory=list)
    answer: str | None = None
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "inputs": self.inputs,
            "passed": self.passed,
            "failures": self.failures,
            "latencyMs": None if self.latency_ms is None else round(self.latency_ms, 1),
            "promptTokens": self.prompt_tokens,
            "completionTokens": self.completion_tokens,
            "answer": self.answer,
        }


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


def assertion_failure(
    assertion: Assertion, answer: str, latency_ms: float, completion_tokens: int | None
) -> str | None:
    """How the answer breaks this assertion (None: it holds)."""
    if assertion.equals is not None and answer.strip() != assertion.equals.strip():
        return f"does not equal {assertion.equals!r}"
    if assertion.contains is not None and assertion.contains not in answer:
        return f"does not contain {assertion.contains!r}"
    if assertion.not_contains is not None and assertion.not_contains in answer:
        return f"contains {assertion.not_contains!r}"
    if assertion.regex is not None and not re.search(assertion.regex, answer):
        return f"does not match /{assertion.regex}/"
    if assertion.json_schema is not None:
        return json_schema_failure(assertion.json_schema, answer)
    if assertion.max_latency_ms is not None and latency_ms > assertion.max_latency_ms:
        return f"took {latency_ms:.0f} ms > {assertion.max_latency_ms} ms"
    if assertion.max_tokens is not None:
        if completion_tokens is None:
            return "the response has no usage.completion_tokens to check maxTokens against"
        if completion_tokens > assertion.max_tokens:
            return f"used {completion_tokens} completion tokens > {assertion.max_tokens}"
    return None


def json_schema_failure(schema: dict[str, Any], answer: str) -> str | None:
    import jsonschema

    try:
        document = json.loads(answer)
    except ValueError as error:
        return f"is not JSON: {error}"
    invalid = jsonschema.exceptions.best_match(
        jsonschema.validators.validator_for(schema)(schema).iter_errors(document)
    )
    if invalid is None:
        return None
    where = "".join(f"[{part!r}]" for part in invalid.absolute_path) or "the document"
    return f"does not match the JSON Schema at {where}: {invalid.message}"


def failed_assertions(
    answer: str,
    expect: list[Assertion],
    latency_ms: float = 0.0,
    completion_tokens: int | None = None,
) -> list[str]:
    """A description of every assertion the answer breaks (empty: it passed)."""
    failures = [assertion_failure(a, answer, latency_ms, completion_tokens) for a in expect]
    return [failure for failure in failures if failure is not None]


def ask(
    base_url: str, body: dict[str, Any], timeout: float, api_key: str | None
) -> tuple[dict[str, Any], float]:
    """(the chat completion, its round trip in ms). EndpointError when the endpoint is down or
    fails; a 4xx (the request's own fault, such as a prompt over the context) is returned as
    {"error": message}."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(
        f"{base_url.rstrip('/')}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers=headers,
        method="POST",
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            completion = json.load(response)
    except urllib.error.HTTPError as error:
        message = _error_message(error)
        if error.code >= 500 or error.code in (401, 403, 404, 429):
            raise EndpointError(f"{base_url}: HTTP {error.code}: {message}") from None
        return {"error": f"HTTP {error.code}: {message}"}, _ms_since(start)
    except (OSError, ValueError) as error:  # refused, unreachable, timed out, not JSON
        raise EndpointError(f"{base_url}: {type(error).__name__}: {error}") from None
    return completion, _ms_since(start)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        return str(json.load(error)["error"]["message"])
    except (ValueError, KeyError, TypeError, OSError):
        return error.reason


def run_case(
    spec: PromptVersionSpec,
    index: int,
    model: str,
    base_url: str,
    timeout: float,
    api_key: str | None,
) -> CaseResult:
    assert spec.evaluation is not None
    case = spec.evaluation.dataset[index]
    result = CaseResult(index, dict(case.inputs))
    try:
        body = chat_request(spec, model, case.inputs)
    except ValueError as error:  # the dataset's inputs do not render: this case fails
        result.failures.append(f"cannot render: {error}")
        return result
    completion, result.latency_ms = ask(base_url, body, timeout, api_key)
    if "error" in completion:
        result.failures.append(str(completion["error"]))
        return result
    try:
        result.answer = completion["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise EndpointError(f"{base_url}: not a chat completion: {completion!r:.200}") from None
    usage = completion.get("usage") or {}
    result.prompt_tokens = usage.get("prompt_tokens")
    result.completion_tokens = usage.get("completion_tokens")
    result.failures = failed_assertions(
        result.answer, case.expect, result.latency_ms, result.completion_tokens
    )
    return result


def evaluate(
    name: str,
    spec: PromptVersionSpec,
    base_url: str,
    model: str,
    timeout: float = REQUEST_TIMEOUT_S,
    api_key: str | None = None,
) -> dict[str, Any]:
    """Run the whole dataset, one request at a time; the JSON report."""
    if spec.evaluation is None:
        raise ValueError(f"PromptVersion {name} has no evaluation")
    cases = [
        run_case(spec, index, model, base_url, timeout, api_key)
        for index in range(len(spec.evaluation.dataset))
    ]
    passed = sum(case.passed for case in cases)
    return {
        "promptVersion": name,
        "promptName": spec.prompt_name,
        "version": spec.version,
        "contentHash": content_hash(spec),
        "endpoint": base_url,
        "model": model,
        "passRate": passed / len(cases),
        "passed": passed,
        "failed": len(cases) - passed,
        "cases": [case.as_json() for case in cases],
    }


def case_failures(report: dict[str, Any]) -> list[str]:
    return [
        f"dataset[{case['index']}]: {'; '.join(case['failures'])}"
        for case in report["cases"]
        if not case["passed"]
    ]


def summary(report: dict[str, Any]) -> str:
    """The termination message: the figures the operator writes into status, under 4 KiB."""
    failures = [failure[:300] for failure in case_failures(report)[:MAX_FAILURES_REPORTED]]
    while True:
        text = json.dumps(
            {
                "contentHash": report["contentHash"],
                "passRate": report["passRate"],
                "passed": report["passed"],
                "failed": report["failed"],
                "failures": failures,
            }
        )
        if len(text.encode()) <= MAX_TERMINATION_MESSAGE_BYTES or not failures:
            return text
        failures.pop()


def print_table(report: dict[str, Any], out: TextIO) -> None:
    rows = [("case", "result", "latency ms", "tokens", "detail")]
    for case in report["cases"]:
        latency = case["latencyMs"]
        tokens = case["completionTokens"]
        rows.append(
            (
                str(case["index"]),
                "pass" if case["passed"] else "FAIL",
                "-" if latency is None else f"{latency:.0f}",
                "-" if tokens is None else str(tokens),
                "; ".join(case["failures"])[:120],
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)]
        print("  ".join([*cells, row[4]]).rstrip(), file=out)
    print(
        f"pass rate {report['passRate']:.3g} ({report['passed']} of "
        f"{report['passed'] + report['failed']} passed)",
        file=out,
    )


def load_promptversion(path: Path) -> tuple[str, PromptVersionSpec]:
    """(name, spec) of a PromptVersion manifest (YAML or JSON); ValueError says what is wrong."""
    import yaml

    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not YAML: {error}") from None
    if not isinstance(document, dict) or document.get("kind") != "PromptVersion":
        raise ValueError(f"{path}: not a PromptVersion manifest (kind: PromptVersion)")
    name = (document.get("metadata") or {}).get("name") or path.stem
    try:
        spec = PromptVersionSpec.model_validate(document.get("spec") or {})
    except ValueError as error:
        raise ValueError(f"{path}: invalid spec: {error}") from None
    if spec.evaluation is None:
        raise ValueError(f"{path}: PromptVersion {name} has no spec.evaluation to run")
    return name, spec


def _write(path: str | None, text: str) -> None:
    if path:
        Path(path).write_text(text)


def eval_command(args: argparse.Namespace) -> int:
    try:
        name, spec = load_promptversion(Path(args.promptversion))
    except (ValueError, OSError) as error:
        _write(args.termination_log, json.dumps({"error": str(error)[:2000]}))
        print(f"kvops eval: {error}", file=sys.stderr)
        return 2
    assert spec.evaluation is not None
    model = args.model or spec.evaluation.llm_deployment
    try:
        report = evaluate(
            name, spec, args.endpoint, model, args.timeout, os.environ.get(API_KEY_ENV)
        )
    except EndpointError as error:
        _write(args.termination_log, json.dumps({"error": str(error)[:2000]}))
        print(f"kvops eval: the endpoint failed, nothing was evaluated: {error}", file=sys.stderr)
        return 1
    print_table(report, sys.stdout)
    _write(args.report, json.dumps(report, indent=2) + "\n")
    _write(args.termination_log, summary(report))
    return 0
