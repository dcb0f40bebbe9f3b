"""Pure prompt logic: check a PromptVersion's template, render it, hash its content, and find
which version holds a label and which LLMDeployments use a version. No API calls: the operator's
handlers and the evaluation build on it."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import meta, sandbox

from kvops.operator.api import PromptVersionSpec

# The most characters one rendering (all messages together) may produce: far beyond any context
# window a worker serves; it bounds the memory one request can make a template take.
MAX_RENDERED_CHARS = 200_000
# The largest integer `**` may make in a template.
_MAX_POWER_BITS = 4096


class RenderError(ValueError):
    """Why a prompt cannot render: a missing or unknown variable, a template error, a sandbox
    refusal or an oversized result; the message names it and never carries a traceback."""


class _BoundedSandbox(sandbox.ImmutableSandboxedEnvironment):
    """The immutable sandbox (no attribute access to Python internals, no mutating calls) that
    also refuses, before computing them, `*` and `**` results that would be huge: the only
    operators that build a large value from small operands in one step."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if (
                    isinstance(sequence, str | list | tuple)
                    and isinstance(count, int)
                    and len(sequence) * count > MAX_RENDERED_CHARS
                ):
                    raise sandbox.SecurityError(
                        f"repeating a sequence would exceed {MAX_RENDERED_CHARS} items"
                    )
        if (
            operator == "**"
            and isinstance(left, int)
            and isinstance(right, int)
            and abs(left) > 1
            and right * abs(left).bit_length() > _MAX_POWER_BITS
        ):
            raise sandbox.SecurityError(f"the power would exceed {_MAX_POWER_BITS} bits")
        return super().call_binop(context, operator, left, right)


_ENVIRONMENT = _BoundedSandbox(undefined=jinja2.StrictUndefined)


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
    """The chat messages for `inputs` (defaults fill the gaps). RenderError names what is wrong:
    a missing required or an undeclared variable, a template error, a sandbox refusal, or a
    result over MAX_RENDERED_CHARS."""
    declared = [v.name for v in spec.variables]
    unknown = sorted(set(inputs) - set(declared))
    if unknown:
        known = ", ".join(declared) or "none"
        raise RenderError(f"unknown variables: {', '.join(unknown)} (declared: {known})")
    values = {v.name: v.default for v in spec.variables if v.default is not None} | inputs
    missing = [v.name for v in spec.variables if v.required and v.name not in values]
    if missing:
        raise RenderError(f"missing required variables: {', '.join(missing)}")
    budget = MAX_RENDERED_CHARS
    messages = []
    for index, message in enumerate(spec.template):
        content = _render(f"template[{index}].content", message.content, values, budget)
        budget -= len(content)
        messages.append({"role": message.role, "content": content})
    return messages


def _render(where: str, source: str, values: dict[str, str], budget: int) -> str:
    """One template rendered, stopped as soon as its output passes `budget` characters."""
    try:
        template = _compiled(source)
    except jinja2.TemplateSyntaxError as error:
        raise RenderError(
            f"{where}: template syntax error: line {error.lineno}: {error.message}"
        ) from None
    parts, size = [], 0
    try:
        for part in template.generate(values):
            size += len(part)
            if size > budget:
                raise RenderError(
                    f"{where}: the rendered prompt exceeds {MAX_RENDERED_CHARS} characters"
                )
            parts.append(part)
    except RenderError:
        raise
    except sandbox.SecurityError as error:
        raise RenderError(f"{where}: refused by the template sandbox: {error}") from None
    except jinja2.UndefinedError as error:
        raise RenderError(f"{where}: {error.message}") from None
    # Whatever else a template raises (a TypeError from `'a' + 1`, a ZeroDivisionError, ...) is
    # the template's fault, never the server's: the client gets its name and message.
    except Exception as error:  # noqa: BLE001
        raise RenderError(f"{where}: {type(error).__name__}: {error}") from None
    return "".join(parts)


@functools.lru_cache(maxsize=256)
def _compiled(source: str) -> jinja2.Template:
    """Compiling takes milliseconds; a worker renders the same few templates for every request."""
    return _ENVIRONMENT.from_string(source)


def content_hash(spec: PromptVersionSpec) -> str:
    """sha256 over what changes the model's input: template, variables and model parameters."""
    content = spec.model_dump(
        mode="json", by_alias=True, include={"template", "variables", "model_parameters"}
    )
    return "sha256:" + hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------- labels, holders and users
#
# Label ownership is computed, never written into anyone's spec: a label belongs to the newest
# eligible version that lists it. Eligible: not being deleted, a spec and template that check,
# the first object to claim its version string, and, where its evaluation is a gate, a last
# evaluation of this very content that reached the threshold. Every input is in the objects
# themselves (spec, creation time, status.lastEvaluation), so any reader (the PromptVersion and
# LLMDeployment handlers, a test) reaches the same answer.

# Versions of one prompt written into a deployment's ConfigMap besides the label holders: the
# newest ones, so that requests may name a version while the ConfigMap stays small.
MAX_SERVED_VERSIONS = 20


def _age_key(version: dict[str, Any]) -> tuple[str, str]:
    """Sorts oldest first: creation time (RFC 3339, UTC), then name for a tie."""
    return version["metadata"].get("creationTimestamp") or "", version["metadata"]["name"]


def versions_of(versions: list[dict[str, Any]], prompt: str) -> list[dict[str, Any]]:
    """The versions of `prompt`, oldest first."""
    return sorted((v for v in versions if v["spec"].get("promptName") == prompt), key=_age_key)


def serving_problem(version: dict[str, Any], siblings: list[dict[str, Any]]) -> str | None:
    """Why this version cannot be served at all (None: it can); `siblings` are all versions of
    its prompt, oldest first."""
    if version["metadata"].get("deletionTimestamp"):
        return "being deleted"
    try:
        spec = PromptVersionSpec.model_validate(version["spec"])
    except ValueError as error:
        return f"invalid spec: {error}"
    template = _checked_template(
        spec.model_dump_json(include={"prompt_name", "version", "template", "variables"})
    )
    if template is not None:
        return f"invalid template: {template}"
    return duplicate_problem(version, spec, siblings)


@functools.lru_cache(maxsize=1024)
def _checked_template(identity: str) -> str | None:
    """template_error by content: a version's template never changes, and every reconcile of a
    prompt checks all its versions (compiling takes milliseconds)."""
    return template_error(PromptVersionSpec.model_validate_json(identity))


def duplicate_problem(
    version: dict[str, Any], spec: PromptVersionSpec, siblings: list[dict[str, Any]]
) -> str | None:
    """Two objects may say they are the same version of a prompt: the older one is it."""
    first = next(
        (
            v
            for v in siblings
            if v["spec"].get("version") == spec.version
            and not v["metadata"].get("deletionTimestamp")
        ),
        version,
    )
    if first["metadata"]["uid"] != version["metadata"]["uid"]:
        return (
            f"version {spec.version} of {spec.prompt_name} is already {first['metadata']['name']}"
        )
    return None


def gate_problem(version: dict[str, Any], spec: PromptVersionSpec) -> str | None:
    """Why the version's evaluation gate keeps it from holding labels (None: no gate or passed)."""
    if spec.evaluation is None or spec.evaluation.gate is None:
        return None
    threshold = spec.evaluation.gate.min_pass_rate
    status = version.get("status") or {}
    last = status.get("lastEvaluation") or {}
    if last.get("contentHash") != content_hash(spec) or last.get("passRate") is None:
        evaluated = next(
            (c for c in status.get("conditions") or [] if c.get("type") == "Evaluated"), None
        )
        if evaluated is not None and evaluated.get("status") == "False" and evaluated["message"]:
            return f"waiting for evaluation: {evaluated['message']}"
        return "waiting for evaluation"
    if last["passRate"] < threshold:
        return f"evaluation pass rate {last['passRate']:.3g} < {threshold:.3g}"
    return None


def label_problem(version: dict[str, Any], siblings: list[dict[str, Any]]) -> str | None:
    """Why this version may hold no label (None: it may hold every label it lists)."""
    problem = serving_problem(version, siblings)
    if problem is not None:
        return problem
    spec = PromptVersionSpec.model_validate(version["spec"])
    return gate_problem(version, spec)


@dataclass(frozen=True)
class PromptLabels:
    """Who holds which label of one prompt, from its versions, each version checked once."""

    siblings: list[dict[str, Any]]  # oldest first
    serving: dict[str, str | None]  # uid -> why it cannot be served at all
    problems: dict[str, str | None]  # uid -> why it may hold no label
    holders: dict[str, dict[str, Any]]  # label -> the version that holds it

    @classmethod
    def of(cls, versions: list[dict[str, Any]], prompt: str) -> PromptLabels:
        siblings = versions_of(versions, prompt)
        serving, problems = {}, {}
        holders: dict[str, dict[str, Any]] = {}
        for version in siblings:  # oldest first: a newer eligible version replaces an older one
            uid = version["metadata"]["uid"]
            serving[uid] = serving_problem(version, siblings)
            problems[uid] = serving[uid] or gate_problem(
                version, PromptVersionSpec.model_validate(version["spec"])
            )
            if problems[uid] is None:
                for label in version["spec"].get("labels") or []:
                    holders[label] = version
        return cls(siblings, serving, problems, holders)

    def report(self, version: dict[str, Any]) -> tuple[list[str], list[dict[str, str]]]:
        """(the labels of its spec.labels the version holds, [{label, reason}] for the others)."""
        uid = version["metadata"]["uid"]
        own = self.problems[uid] if uid in self.problems else label_problem(version, self.siblings)
        held, not_held = [], []
        for label in version["spec"].get("labels") or []:
            holder = self.holders.get(label)
            if holder is not None and holder["metadata"]["uid"] == uid:
                held.append(label)
            elif own is not None:
                not_held.append({"label": label, "reason": own})
            else:
                assert holder is not None  # an eligible version lists it: someone holds it
                name = holder["metadata"]["name"]
                not_held.append({"label": label, "reason": f"{label} is held by {name} (newer)"})
        return held, not_held

    def users(self, version: dict[str, Any], deployments: list[dict[str, Any]]) -> list[str]:
        """Names of the LLMDeployments whose references to this prompt resolve to `version`."""
        prompt = version["spec"].get("promptName")
        users = []
        for deployment in deployments:
            for ref in deployment["spec"].get("prompts") or []:
                holder = self.holders.get(ref.get("label", "production"))
                if (
                    ref["name"] == prompt
                    and holder is not None
                    and holder["metadata"]["uid"] == version["metadata"]["uid"]
                ):
                    users.append(deployment["metadata"]["name"])
                    break
        return sorted(users)

    def unheld_reason(self, label: str) -> str:
        """Why no version holds `label`."""
        listing = [v for v in self.siblings if label in (v["spec"].get("labels") or [])]
        if not self.siblings:
            return "no PromptVersion of this prompt exists"
        if not listing:
            return f"no version lists the label {label}"
        reasons = "; ".join(
            f"{v['metadata']['name']}: {self.problems[v['metadata']['uid']]}"
            for v in reversed(listing)
        )
        return f"no version that lists {label} may hold it ({reasons})"


def label_holders(versions: list[dict[str, Any]], prompt: str) -> dict[str, dict[str, Any]]:
    """Label -> the version of `prompt` that holds it: the newest eligible one that lists it."""
    return PromptLabels.of(versions, prompt).holders


def holder_of_label(versions: list[dict[str, Any]], prompt: str, label: str) -> dict | None:
    return label_holders(versions, prompt).get(label)


def label_report(
    version: dict[str, Any], versions: list[dict[str, Any]]
) -> tuple[list[str], list[dict[str, str]]]:
    """(the labels of spec.labels this version holds, [{label, reason}] for the others)."""
    return PromptLabels.of(versions, version["spec"].get("promptName")).report(version)


def users_of(
    version: dict[str, Any], versions: list[dict[str, Any]], deployments: list[dict[str, Any]]
) -> list[str]:
    """Names of the LLMDeployments whose prompt references resolve to `version`."""
    return PromptLabels.of(versions, version["spec"].get("promptName")).users(version, deployments)


def served_version(version: dict[str, Any]) -> dict[str, Any]:
    """One version as a deployment's ConfigMap carries it (every field spelled out)."""
    spec = PromptVersionSpec.model_validate(version["spec"])
    return {
        "promptVersion": version["metadata"]["name"],
        "version": spec.version,
        "contentHash": content_hash(spec),
        "template": [m.model_dump(mode="json", by_alias=True) for m in spec.template],
        "variables": [v.model_dump(mode="json", by_alias=True) for v in spec.variables],
        "modelParameters": spec.model_parameters.model_dump(mode="json", by_alias=True),
    }


def served_prompts(refs: list[tuple[str, str]], versions: list[dict[str, Any]]) -> dict[str, Any]:
    """What a deployment's `prompts.json` holds for its (prompt, label) references: per prompt,
    the labels it references that some version holds now and every servable version (the newest
    MAX_SERVED_VERSIONS plus the holders); the references no version holds, with the reason."""
    prompts: dict[str, Any] = {}
    unresolved = []
    for name in dict.fromkeys(name for name, _ in refs):
        labels = PromptLabels.of(versions, name)
        servable = [v for v in labels.siblings if labels.serving[v["metadata"]["uid"]] is None]
        chosen = {v["metadata"]["uid"]: v for v in servable[-MAX_SERVED_VERSIONS:]}
        chosen |= {v["metadata"]["uid"]: v for v in labels.holders.values()}
        held = {}
        for label in dict.fromkeys(label for ref_name, label in refs if ref_name == name):
            holder = labels.holders.get(label)
            if holder is not None:
                held[label] = holder["spec"]["version"]
            else:
                unresolved.append(
                    {"name": name, "label": label, "reason": labels.unheld_reason(label)}
                )
        prompts[name] = {
            "labels": held,
            "versions": {
                v["spec"]["version"]: served_version(v)
                for v in sorted(chosen.values(), key=_age_key)
            },
        }
    return {"prompts": prompts, "unresolved": unresolved}
