"""PromptVersion: validate the chat template and hash its content (pure functions), then the
handlers that write status, keep each label on one version of a prompt, and refresh the prompt
ConfigMaps of the LLMDeployments that reference a moved label."""

from __future__ import annotations

from typing import Any

import kopf

from kvops.operator import evaluation, kube, llmdeployment
from kvops.operator.api import API_VERSION, PromptVersionSpec
from kvops.operator.prompts import content_hash, template_error, users_of


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
            kube.event(
                body,
                "Normal",
                "LabelMoved",
                f"{sorted(mine & set(labels))} moved from {other['metadata']['name']}",
            )


def refresh_deployments(namespace: str, prompt: str) -> None:
    """Re-render the LLMDeployments that reference `prompt` (their prompt ConfigMaps)."""
    for deployment in kube.list_objects(API_VERSION, "LLMDeployment", namespace):
        if any(ref["name"] == prompt for ref in deployment["spec"].get("prompts", [])):
            llmdeployment.reconcile(deployment)


def evaluate_if_due(body: dict[str, Any], spec: PromptVersionSpec, endpoint_template: str) -> None:
    """Run the evaluation once per content and target; retried while the target is not up."""
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
    summary = f"{result['passed']} passed, {result['failed']} failed against {target}"
    kube.event(body, "Warning" if result["failed"] else "Normal", "Evaluated", summary)


def invalid_status(body: dict[str, Any], message: str) -> dict[str, Any]:
    """Status of a spec the models refuse (only when the CRD's own validation was bypassed)."""
    generation = body["metadata"].get("generation")
    previous = (body.get("status") or {}).get("conditions") or []
    ready = kube.condition(previous, "Ready", False, "InvalidSpec", message, generation)
    return {
        "observedGeneration": generation,
        "valid": False,
        "error": message,
        "conditions": [ready],
    }


def reconcile(body: dict[str, Any], claim: bool, endpoint_template: str) -> None:
    with kube.reconciling(body, "PromptVersion") as current:
        if current is None:
            return
        body = current
        try:
            spec = PromptVersionSpec.model_validate(body["spec"])
        except ValueError as error:
            status = invalid_status(body, f"invalid spec: {error}")
            kube.warn_on_new_problem(body, "Ready", "InvalidSpec", status["error"])
            kube.patch_status(body, status)
            return
        namespace = body["metadata"]["namespace"]
        status = render_status(body, spec)
        old_valid = (body.get("status") or {}).get("valid")
        if old_valid != status["valid"]:
            kind = "Normal" if status["valid"] else "Warning"
            ready = status["conditions"][0]
            kube.event(body, kind, ready["reason"], ready["message"])
        # Status first: holder_of_label only trusts versions whose status says valid.
        kube.patch_status(body, status)
        versions = kube.list_objects(API_VERSION, "PromptVersion", namespace)
        if claim:
            claim_labels(body, versions)
            versions = kube.list_objects(API_VERSION, "PromptVersion", namespace)
        refresh_deployments(namespace, spec.prompt_name)
        mine = next(v for v in versions if v["metadata"]["uid"] == body["metadata"]["uid"])
        deployments = kube.list_objects(API_VERSION, "LLMDeployment", namespace)
        kube.patch_status(body, {"usedBy": users_of(mine, versions, deployments)})
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
def on_deleted(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """A deleted version may have held a label: its deployments fall back or lose the prompt."""
    if event["type"] == "DELETED":
        refresh_deployments(body["metadata"]["namespace"], body["spec"]["promptName"])
