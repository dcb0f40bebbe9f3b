"""PromptVersion: validate the chat template and hash its content (pure functions), then the
handlers that write status, keep each label on one version of a prompt, and refresh the prompt
ConfigMaps of the LLMDeployments that reference a moved label."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jinja2
import kopf
from jinja2 import meta, sandbox

from kvops.operator import kube
from kvops.operator.api import API_VERSION, PromptVersionSpec
from kvops.operator.metrics import measured

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


def render_status(body: dict[str, Any], spec: PromptVersionSpec) -> dict[str, Any]:
    error = template_error(spec)
    generation = body["metadata"].get("generation")
    previous = (body.get("status") or {}).get("conditions") or []
    ready = kube.condition(
        previous,
        "Ready",
        error is None,
        "TemplateValid" if error is None else "TemplateInvalid",
        error or "the template renders with its declared variables",
        generation,
    )
    return {
        "observedGeneration": generation,
        "valid": error is None,
        "error": error,
        "contentHash": content_hash(spec),
        "conditions": [ready],
    }


# ---------------------------------------------------------------------------------------- handlers


def claim_labels(body: dict[str, Any], versions: list[dict[str, Any]]) -> None:
    """Take this version's labels away from the other versions of the same prompt."""
    mine = set(body["spec"].get("labels", []))
    for other in versions:
        if other["metadata"]["uid"] == body["metadata"]["uid"]:
            continue
        if other["spec"].get("promptName") != body["spec"]["promptName"]:
            continue
        labels = other["spec"].get("labels", [])
        if mine & set(labels):
            kept = [label for label in labels if label not in mine]
            kube.patch(
                API_VERSION,
                "PromptVersion",
                other["metadata"]["name"],
                other["metadata"]["namespace"],
                {"spec": {"labels": kept}},
            )
            kopf.event(
                body,
                type="Normal",
                reason="LabelMoved",
                message=f"{sorted(mine & set(labels))} moved from {other['metadata']['name']}",
            )


def refresh_deployments(namespace: str, prompt: str) -> None:
    """Re-render the LLMDeployments that reference `prompt` (their prompt ConfigMaps)."""
    from kvops.operator import llmdeployment

    for deployment in kube.list_objects(API_VERSION, "LLMDeployment", namespace):
        if any(ref["name"] == prompt for ref in deployment["spec"].get("prompts", [])):
            llmdeployment.reconcile(deployment)


def evaluate_if_due(body: dict[str, Any], spec: PromptVersionSpec, endpoint_template: str) -> None:
    """Run the evaluation once per content and target; retried while the target is not up."""
    from kvops.operator import evaluation  # it imports this module

    if spec.evaluation is None:
        return
    target = spec.evaluation.llm_deployment
    digest = content_hash(spec)
    last = (body.get("status") or {}).get("lastEvaluation") or {}
    if last.get("contentHash") == digest and last.get("target") == target:
        return
    namespace = body["metadata"]["namespace"]
    deployment = kube.get(API_VERSION, "LLMDeployment", target, namespace)
    if deployment is None or (deployment.get("status") or {}).get("phase") != "Available":
        raise kopf.TemporaryError(f"evaluation waits for LLMDeployment {target}", delay=30)
    model = deployment["spec"]["model"].get("servedName") or target
    base_url = endpoint_template.format(name=target, namespace=namespace)
    try:
        result = evaluation.evaluate(spec, base_url, model)
    except OSError as error:
        message = f"evaluation against {target}: {evaluation.endpoint_error(error)}"
        raise kopf.TemporaryError(message, delay=30) from error
    kube.patch_status(
        body,
        {
            "lastEvaluation": {
                "time": kube.now(),
                "target": target,
                "contentHash": digest,
                **result,
            }
        },
    )
    kopf.event(
        body,
        type="Warning" if result["failed"] else "Normal",
        reason="Evaluated",
        message=f"{result['passed']} passed, {result['failed']} failed against {target}",
    )


def reconcile(body: dict[str, Any], claim: bool, endpoint_template: str) -> None:
    if body["metadata"].get("deletionTimestamp"):
        return
    with measured("PromptVersion"):
        try:
            spec = PromptVersionSpec.model_validate(body["spec"])
        except ValueError as error:
            raise kopf.PermanentError(f"invalid spec: {error}") from error
        namespace = body["metadata"]["namespace"]
        status = render_status(body, spec)
        old_valid = (body.get("status") or {}).get("valid")
        if old_valid != status["valid"]:
            kind = "Normal" if status["valid"] else "Warning"
            kopf.event(
                body,
                type=kind,
                reason=status["conditions"][0]["reason"],
                message=status["conditions"][0]["message"],
            )
        # Status first: holder_of_label only trusts versions whose status says valid.
        kube.patch_status(body, status)
        versions = kube.list_objects(API_VERSION, "PromptVersion", namespace)
        if claim:
            claim_labels(body, versions)
            versions = kube.list_objects(API_VERSION, "PromptVersion", namespace)
        refresh_deployments(namespace, spec.prompt_name)
        current = next(v for v in versions if v["metadata"]["uid"] == body["metadata"]["uid"])
        deployments = kube.list_objects(API_VERSION, "LLMDeployment", namespace)
        kube.patch_status(body, {"usedBy": users_of(current, versions, deployments)})
        if status["valid"]:
            evaluate_if_due(body, spec, endpoint_template)


@kopf.on.create(API_VERSION, "promptversions")
@kopf.on.update(API_VERSION, "promptversions", field="spec")
def on_change(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    reconcile(kube.plain(body), claim=True, endpoint_template=memo.endpoint_template)


@kopf.on.resume(API_VERSION, "promptversions")
def on_resume(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    reconcile(kube.plain(body), claim=False, endpoint_template=memo.endpoint_template)


@kopf.on.event(API_VERSION, "promptversions")
def on_deleted(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
    """A deleted version may have held a label: its deployments fall back or lose the prompt."""
    if event["type"] == "DELETED":
        refresh_deployments(body["metadata"]["namespace"], body["spec"]["promptName"])
