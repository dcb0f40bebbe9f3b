"""Pure prompt logic: check a PromptVersion's template, render it, hash its content, and find
which version holds a label and which LLMDeployments use a version. No API calls: the operator's
handlers and the evaluation build on it."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jinja2
from jinja2 import meta, sandbox

from kvops.operator.api import PromptVersionSpec

_ENVIRONMENT = sandbox.ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined)


def template_error(spec: PromptVersionSpec) -> str | None:
    """Why the template cannot render with its declared variables, naming the message; or None."""
    declared = {variable.name for variable in spec.variables}
    sample = {
        variable.name: variable.default or f"<{variable.name}>" for variable in spec.variables
    }
    for index, message in enumerate(spec.template):
        where = f"template[{index}].content"
        try:
            parsed = _ENVIRONMENT.parse(message.content)
        except jinja2.TemplateSyntaxError as error:
            return f"{where}: line {error.lineno}: {error.message}"
        undeclared = sorted(meta.find_undeclared_variables(parsed) - declared)
        if undeclared:
            return f"{where}: undeclared variables {', '.join(undeclared)} (add them to variables)"
        try:
            _ENVIRONMENT.from_string(message.content).render(sample)
        except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError) as error:
            return f"{where}: {type(error).__name__}: {error}"
    return None


def render_messages(spec: PromptVersionSpec, inputs: dict[str, str]) -> list[dict[str, str]]:
    """The chat messages for `inputs` (defaults fill the gaps); ValueError names what is missing."""
    values = {v.name: v.default for v in spec.variables if v.default is not None} | inputs
    missing = [v.name for v in spec.variables if v.required and v.name not in values]
    if missing:
        raise ValueError(f"missing required variables: {', '.join(missing)}")
    return [
        {"role": m.role, "content": _ENVIRONMENT.from_string(m.content).render(values)}
        for m in spec.template
    ]


def content_hash(spec: PromptVersionSpec) -> str:
    """sha256 over what changes the model's input: template, variables and model parameters."""
    content = spec.model_dump(
        mode="json", by_alias=True, include={"template", "variables", "model_parameters"}
    )
    return "sha256:" + hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def holder_of_label(versions: list[dict[str, Any]], prompt: str, label: str) -> dict | None:
    """The valid version of `prompt` that holds `label`; the newest if a move is half done."""
    holders = [
        v
        for v in versions
        if v["spec"].get("promptName") == prompt
        and label in v["spec"].get("labels", [])
        and (v.get("status") or {}).get("valid") is True
        and not v["metadata"].get("deletionTimestamp")
    ]
    return max(holders, key=lambda v: v["metadata"]["creationTimestamp"], default=None)


def users_of(
    version: dict[str, Any], versions: list[dict[str, Any]], deployments: list[dict[str, Any]]
) -> list[str]:
    """Names of the LLMDeployments whose prompt references resolve to `version`."""
    users = []
    for deployment in deployments:
        for ref in deployment["spec"].get("prompts", []):
            holder = holder_of_label(versions, ref["name"], ref.get("label", "production"))
            if holder is not None and holder["metadata"]["uid"] == version["metadata"]["uid"]:
                users.append(deployment["metadata"]["name"])
                break
    return sorted(users)
