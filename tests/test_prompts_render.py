"""Rendering managed prompts (kvops.operator.prompts, shared by the operator and the worker) and
the worker's prompt store (kvops.worker.serve.prompts): errors that name the problem, never a
crash; labels and reloads as the operator's prompts.json says."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kvops.operator.api import PromptVersionSpec
from kvops.operator.prompts import MAX_RENDERED_CHARS, RenderError, render_messages
from kvops.worker.serve.prompts import PromptStore, UnknownPrompt


def spec(content: str, variables=({"name": "question"},)) -> PromptVersionSpec:
    return PromptVersionSpec.model_validate(
        {
            "promptName": "support",
            "version": "1",
            "template": [
                {"role": "system", "content": "You answer about kvops."},
                {"role": "user", "content": content},
            ],
            "variables": list(variables),
        }
    )


def test_renders_with_defaults_and_filters():
    variables = [{"name": "question"}, {"name": "tone", "required": False, "default": "brief"}]
    messages = render_messages(
        spec("{{ question | upper }} ({{ tone }})", variables), {"question": "hi"}
    )
    assert messages == [
        {"role": "system", "content": "You answer about kvops."},
        {"role": "user", "content": "HI (brief)"},
    ]
    overridden = render_messages(spec("{{ tone }}", variables), {"question": "", "tone": "long"})
    assert overridden[1]["content"] == "long"


@pytest.mark.parametrize(
    ("content", "inputs", "expected"),
    [
        ("{{ question }}", {}, "missing required variables: question"),
        ("{{ question }}", {"question": "q", "colour": "red"}, "unknown variables: colour"),
        ("{{ question }", {"question": "q"}, "template[1].content: template syntax error: line 1"),
        (
            "{{ ''.__class__.__mro__ }}",
            {"question": "q"},
            "template[1].content: refused by the template sandbox: access to attribute "
            "'__class__' of 'str' object is unsafe",
        ),
        (
            "{{ question.__init__.__globals__ }}",
            {"question": "q"},
            "refused by the template sandbox",
        ),
        ("{{ question.append(1) }}", {"question": "q"}, "template[1].content:"),
        ("{{ context }}", {"question": "q"}, "template[1].content: 'context' is undefined"),
        ("{{ 1 / 0 }}", {"question": "q"}, "ZeroDivisionError: division by zero"),
        ("{{ question * 10**9 }}", {"question": "q"}, "would exceed 200000 items"),
        ("{{ 7 ** 100000 }}", {"question": "q"}, "the power would exceed 4096 bits"),
        (
            "{% for i in range(100000) %}{{ question }}{% endfor %}",
            {"question": "abc"},
            f"the rendered prompt exceeds {MAX_RENDERED_CHARS} characters",
        ),
    ],
)
def test_rendering_errors_name_the_problem(content, inputs, expected):
    with pytest.raises(RenderError) as raised:
        render_messages(spec(content), inputs)
    message = str(raised.value)
    assert expected in message
    assert "Traceback" not in message and "File " not in message
    assert raised.value.__cause__ is None, "no Python exception chain travels with the error"


def test_a_big_variable_cannot_make_a_huge_prompt():
    with pytest.raises(RenderError, match="exceeds"):
        render_messages(spec("{{ question }}"), {"question": "x" * (MAX_RENDERED_CHARS + 1)})


# ------------------------------------------------------------------------------- prompt store


def version(number: str, content: str, max_tokens: int = 8) -> dict:
    return {
        "promptVersion": f"support-v{number}",
        "version": number,
        "contentHash": f"sha256:{number * 8}",
        "template": [{"role": "user", "content": content}],
        "variables": [{"name": "question", "required": True, "default": None}],
        "modelParameters": {"temperature": 0.0, "topP": None, "maxTokens": max_tokens, "stop": []},
    }


def prompts_file(labels: dict[str, str], unresolved=()) -> dict:
    return {
        "prompts": {
            "support": {
                "labels": labels,
                "versions": {
                    "1": version("1", "v1 {{ question }}"),
                    "2": version("2", "v2 {{ question }}"),
                },
            }
        },
        "unresolved": list(unresolved),
    }


def write(directory: Path, content: dict | str) -> None:
    """As the kubelet does: the new file appears whole, under the same name."""
    staged = directory / ".prompts.json.new"
    staged.write_text(content if isinstance(content, str) else json.dumps(content))
    os.replace(staged, directory / "prompts.json")


def test_store_resolves_labels_and_versions_and_follows_the_file(tmp_path):
    write(tmp_path, prompts_file({"production": "1"}))
    store = PromptStore(tmp_path, poll_interval=0)
    production = store.resolve("support")
    assert (production.version, production.content_hash) == ("1", "sha256:11111111")
    assert production.render({"question": "hi"}) == [{"role": "user", "content": "v1 hi"}]
    assert production.model_parameters.max_tokens == 8
    assert store.resolve("support", version="2").version == "2"

    write(tmp_path, prompts_file({"production": "2"}))
    assert store.resolve("support", label="production").version == "2"

    # A file that does not parse is logged; the previous prompts keep serving.
    write(tmp_path, '{"prompts": {"support": {"versions": {"3": {"version": 3}}}}}')
    assert store.resolve("support").version == "2"
    assert "prompts.json could not be used" in store.problem
    write(tmp_path, "not json")
    assert store.resolve("support").version == "2"

    write(tmp_path, prompts_file({"production": "1"}))
    assert store.resolve("support").version == "1" and store.problem is None


def test_store_says_what_it_serves_when_a_lookup_misses(tmp_path):
    reason = "no valid version lists the label canary"
    write(
        tmp_path,
        prompts_file(
            {"production": "1"}, [{"name": "support", "label": "canary", "reason": reason}]
        ),
    )
    store = PromptStore(tmp_path)
    with pytest.raises(
        UnknownPrompt, match=r"prompt 'sales' is not served here \(prompts: support\)"
    ):
        store.resolve("sales")
    with pytest.raises(UnknownPrompt, match=r"has no version '9' \(versions: 1, 2\)"):
        store.resolve("support", version="9")
    with pytest.raises(UnknownPrompt, match=f"holds the label 'canary' .*: {reason}"):
        store.resolve("support", label="canary")


def test_store_without_a_file_serves_nothing_and_says_why(tmp_path):
    store = PromptStore(tmp_path, poll_interval=0)
    with pytest.raises(UnknownPrompt, match="prompts.json does not exist"):
        store.resolve("support")
    write(tmp_path, prompts_file({"production": "2"}))
    assert store.resolve("support").version == "2"
    with pytest.raises(UnknownPrompt, match="prompts: none"):
        PromptStore(None).resolve("support")
