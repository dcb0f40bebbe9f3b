"""PromptVersions against a real control plane (kube-apiserver, controller manager, scheduler,
kwok's fake nodes) with `kvops operator` under its least-privilege Role: labels held by the
newest eligible version, evaluation-gated promotion, GitOps re-applies, immutability.

The limit of this file: kwok runs no container, so an evaluation Job's pod never runs
`kvops eval` here. Where a test needs a finished evaluation it completes the pod the way a
kubelet would, by patching the pod's status (phase Succeeded or Failed, the container's
terminated state and its termination message, in the exact format `kvops eval
--termination-log` writes); the real controller manager then completes or fails the Job. What
`kvops eval` itself reports against a real engine is tested in tests/test_operator_prompts.py.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_helpers import terminate_pod
from test_operator_cluster import Kube, llmd, operator_under_its_role, restricted_namespace

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def namespace(kube_cluster) -> str:
    """Restricted Pod Security: the evaluation pods must pass it."""
    with restricted_namespace(kube_cluster, "kvops-prompts") as name:
        yield name


@pytest.fixture(scope="module")
def operator(kube_cluster, namespace, tmp_path_factory):
    with operator_under_its_role(
        kube_cluster, namespace, tmp_path_factory.mktemp("operator")
    ) as process:
        yield process


@pytest.fixture
def kube(kube_cluster, namespace, operator) -> Kube:
    return Kube(kube_cluster, namespace, operator)


def version_file(
    name: str, prompt: str, labels: list[str], gate: float | None = None, dataset=None
) -> dict[str, Any]:
    """A PromptVersion as a user keeps it in git."""
    spec: dict[str, Any] = {
        "promptName": prompt,
        "version": name.rsplit("-", 1)[-1],
        "template": [{"role": "user", "content": f"{name}: {{{{ question }}}}"}],
        "variables": [{"name": "question"}],
        "labels": labels,
    }
    if gate is not None:
        spec["evaluation"] = {
            "llmDeployment": f"{prompt}-bot",
            "dataset": dataset
            or [
                {"inputs": {"question": "Hi?"}, "expect": [{"regex": "\\S"}]},
                {"inputs": {"question": "Bye?"}, "expect": [{"contains": "bye"}]},
            ],
            "gate": {"minPassRate": gate},
        }
    return {
        "apiVersion": "kvops.io/v1alpha1",
        "kind": "PromptVersion",
        "metadata": {"name": name},
        "spec": spec,
    }


def apply_files(kube: Kube, folder: Path, *versions: dict[str, Any]) -> str:
    """Write the manifests as files and `kubectl apply -f` them, as a GitOps sync does."""
    paths = []
    for version in versions:
        path = folder / f"{version['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(version))
        paths.append(str(path))
    return kube("apply", *[arg for path in paths for arg in ("-f", path)])


def served(kube: Kube, deployment: str, prompt: str) -> dict[str, Any]:
    data = (kube.get("configmap", f"{deployment}-prompts") or {}).get("data", {})
    return json.loads(data.get("prompts.json", "{}")).get("prompts", {}).get(prompt, {})


def production_served(kube: Kube, deployment: str, prompt: str) -> str | None:
    return served(kube, deployment, prompt).get("labels", {}).get("production")


def eval_jobs(kube: Kube, version: str) -> list[dict[str, Any]]:
    uid = kube.get("pver", version)["metadata"]["uid"]
    jobs = kube.items("jobs", f"kvops.io/promptversion-uid={uid}")
    return [job for job in jobs if not job["metadata"].get("deletionTimestamp")]


def wait_for_new_job(kube: Kube, version: str, not_named: set[str] = frozenset()) -> dict:
    def job():
        jobs = [j for j in eval_jobs(kube, version) if j["metadata"]["name"] not in not_named]
        return jobs[0] if len(jobs) == 1 else None

    return kube.wait(f"an evaluation Job of {version}", job)


def finish_eval_pod(kube: Kube, job: dict[str, Any], exit_code: int, message: dict) -> None:
    """Complete the Job's pod as a kubelet would: its status says the container terminated
    with `exit_code`, leaving `message` (JSON) as its termination message."""
    name = job["metadata"]["name"]

    def running_pod():
        pods = kube.items("pods", f"job-name={name}")
        running = [p for p in pods if p["status"].get("phase") == "Running"]
        return running[0] if running else None

    pod = kube.wait(f"the pod of {name} running on a fake node", running_pod)
    terminate_pod(kube, pod, exit_code, json.dumps(message))


def summary(kube: Kube, version: str, passed: int, failed: int) -> dict[str, Any]:
    """What `kvops eval --termination-log` writes for this result."""
    return {
        "contentHash": kube.status("pver", version)["contentHash"],
        "passRate": passed / (passed + failed),
        "passed": passed,
        "failed": failed,
        "failures": ["dataset[1]: does not contain 'bye'"] * failed,
    }


def not_held_reason(kube: Kube, version: str, label: str = "production") -> str | None:
    for entry in kube.status("pver", version).get("labelsNotHeld", []):
        if entry["label"] == label:
            return entry["reason"]
    return None


def test_a_gated_label_stays_while_the_new_version_fails_and_moves_when_it_passes(kube, tmp_path):
    v1 = version_file("faq-v1", "faq", ["production"])
    v2 = version_file("faq-v2", "faq", ["production"], gate=0.8)
    apply_files(kube, tmp_path, v1, v2)
    # No target yet: the evaluation waits for it, and so does the label.
    kube.wait(
        "faq-v2 to wait for its LLMDeployment",
        lambda: (
            not_held_reason(kube, "faq-v2")
            == "waiting for evaluation: LLMDeployment faq-bot does not exist"
        ),
    )
    assert kube.status("pver", "faq-v1")["heldLabels"] == ["production"]
    assert eval_jobs(kube, "faq-v2") == []

    kube.apply(llmd("faq-bot", prompts=[{"name": "faq"}]))
    kube.wait_available("faq-bot", 1)
    kube.wait("faq-bot to serve faq-v1", lambda: production_served(kube, "faq-bot", "faq") == "v1")
    first = wait_for_new_job(kube, "faq-v2")
    pod_spec = first["spec"]["template"]["spec"]
    [container] = pod_spec["containers"]
    assert (
        container["image"]
        == kube.get("deployment", "faq-bot")["spec"]["template"]["spec"]["containers"][0]["image"]
    )
    args = container["args"]
    assert args[0] == "eval"
    assert args[args.index("--endpoint") + 1] == f"http://faq-bot.{kube.namespace}.svc:8000"
    assert kube.get("configmap", first["metadata"]["name"]) is not None
    kube.wait(
        "faq-v2 to wait for its running evaluation",
        lambda: (not_held_reason(kube, "faq-v2") or "").startswith(
            f"waiting for evaluation: the evaluation Job {first['metadata']['name']} is running"
        ),
    )

    # The evaluation fails its gate: the label stays on faq-v1.
    finish_eval_pod(kube, first, 0, summary(kube, "faq-v2", passed=1, failed=1))
    result = kube.wait(
        "faq-v2's evaluation result",
        lambda: kube.status("pver", "faq-v2").get("lastEvaluation"),
    )
    assert (result["passRate"], result["passed"], result["failed"]) == (0.5, 1, 1)
    assert result["job"] == first["metadata"]["name"] and result["target"] == "faq-bot"
    assert result["failures"] == ["dataset[1]: does not contain 'bye'"]
    assert result["contentHash"] == kube.status("pver", "faq-v2")["contentHash"]
    kube.wait(
        "faq-v2 to say why it does not hold production",
        lambda: not_held_reason(kube, "faq-v2") == "evaluation pass rate 0.5 < 0.8",
    )
    assert kube.status("pver", "faq-v1")["heldLabels"] == ["production"]
    assert production_served(kube, "faq-bot", "faq") == "v1"
    evaluated = kube.condition("pver", "faq-v2", "Evaluated")
    assert evaluated["status"] == "True"
    assert evaluated["message"] == "pass rate 0.5 (1 of 2 cases passed)"

    # The dataset is fixed (the evaluation is editable): a new Job runs, the old one goes.
    fixed = copy.deepcopy(v2)
    fixed["spec"]["evaluation"]["dataset"][1]["expect"] = [{"notContains": "zzzz"}]
    apply_files(kube, tmp_path, fixed)
    second = wait_for_new_job(kube, "faq-v2", not_named={first["metadata"]["name"]})
    kube.wait(
        "the first evaluation Job to be deleted",
        lambda: (
            kube.get("job", first["metadata"]["name"]) is None
            or kube.get("job", first["metadata"]["name"])["metadata"].get("deletionTimestamp")
        ),
    )
    # Until the new result, the old one stands: the label does not flap.
    assert production_served(kube, "faq-bot", "faq") == "v1"
    finish_eval_pod(kube, second, 0, summary(kube, "faq-v2", passed=2, failed=0))
    kube.wait("faq-bot to serve faq-v2", lambda: production_served(kube, "faq-bot", "faq") == "v2")
    kube.wait(
        "the statuses of both versions to follow the move",
        lambda: (
            kube.status("pver", "faq-v2").get("heldLabels") == ["production"]
            and not_held_reason(kube, "faq-v1") == "production is held by faq-v2 (newer)"
            and kube.status("pver", "faq-v2").get("usedBy") == ["faq-bot"]
        ),
    )
    assert kube.status("pver", "faq-v2")["lastEvaluation"]["passRate"] == 1.0
    assert kube.get("pver", "faq-v1")["spec"]["labels"] == ["production"]  # never edited


def test_reapplying_the_files_after_a_promotion_changes_nothing(kube, tmp_path):
    files = [
        version_file("greet-v1", "greet", ["production"]),
        version_file("greet-v2", "greet", ["production"], gate=0.5),
    ]
    apply_files(kube, tmp_path, *files)
    kube.apply(llmd("greet-bot", prompts=[{"name": "greet"}]))
    kube.wait_available("greet-bot", 1)
    job = wait_for_new_job(kube, "greet-v2")
    kube.wait(
        "greet-bot to serve greet-v1", lambda: production_served(kube, "greet-bot", "greet") == "v1"
    )
    finish_eval_pod(kube, job, 0, summary(kube, "greet-v2", passed=2, failed=0))
    kube.wait(
        "the promotion of greet-v2",
        lambda: (
            production_served(kube, "greet-bot", "greet") == "v2"
            and kube.status("pver", "greet-v1").get("heldLabels") == []
            and kube.status("pver", "greet-v2").get("heldLabels") == ["production"]
        ),
    )

    def snapshot() -> dict[str, Any]:
        versions = {name: kube.get("pver", name) for name in ("greet-v1", "greet-v2")}
        return {
            "specs": {name: v["spec"] for name, v in versions.items()},
            "generations": {name: v["metadata"]["generation"] for name, v in versions.items()},
            "held": {name: v["status"]["heldLabels"] for name, v in versions.items()},
            "evaluation": versions["greet-v2"]["status"]["lastEvaluation"],
            "config map": kube.get("configmap", "greet-bot-prompts")["metadata"]["resourceVersion"],
            "jobs": sorted(j["metadata"]["name"] for j in eval_jobs(kube, "greet-v2")),
        }

    before = snapshot()
    # kubectl's client-side apply sends the files' `variables` again (the live items carry the
    # CRD's defaults) and says "configured"; nothing changes. Then server-side apply, forcing
    # conflicts as Flux does.
    apply_files(kube, tmp_path, *files)
    kube("apply", "--server-side", "--force-conflicts", "-f", str(tmp_path))
    time.sleep(5)  # the operator reacts to a change within a second or two
    assert snapshot() == before

    # A newer version with a broken template that lists production never takes it.
    broken = version_file("greet-v3", "greet", ["production"])
    broken["spec"]["template"][0]["content"] = "{{ question }"
    apply_files(kube, tmp_path, broken)
    reason = kube.wait("greet-v3 refused the label", lambda: not_held_reason(kube, "greet-v3"))
    assert reason.startswith("invalid template: template[0].content: line 1:")
    assert kube.status("pver", "greet-v3")["valid"] is False
    time.sleep(2)
    assert production_served(kube, "greet-bot", "greet") == "v2"
    assert sorted(served(kube, "greet-bot", "greet")["versions"]) == ["v1", "v2"]
    assert kube.status("pver", "greet-v2")["heldLabels"] == ["production"]


def test_a_failed_evaluation_job_says_why_and_a_change_replaces_it(kube, tmp_path):
    version = version_file("sum-v1", "sum", ["production"], gate=0.5)
    kube.apply(llmd("sum-bot"))
    kube.wait_available("sum-bot", 1)
    apply_files(kube, tmp_path, version)
    job = wait_for_new_job(kube, "sum-v1")
    error = {"error": "http://sum-bot:8000: URLError: <urlopen error [Errno 111] refused>"}
    for failures in range(1, 4):  # backoffLimit 2: the third failed pod fails the Job
        finish_eval_pod(kube, job, 1, error)
        kube.wait(
            f"{failures} failed pods counted",
            lambda failures=failures: (
                (kube.get("job", job["metadata"]["name"]).get("status") or {}).get("failed", 0)
                >= failures
            ),
        )
    condition = kube.wait(
        "the failure in sum-v1's status",
        lambda: (
            (c := kube.condition("pver", "sum-v1", "Evaluated"))
            and c["reason"] == "EvaluationFailed"
            and c
        ),
    )
    assert condition["message"] == (
        f"the evaluation Job {job['metadata']['name']} failed: {error['error']}"
    )
    assert not_held_reason(kube, "sum-v1") == f"waiting for evaluation: {condition['message']}"
    # A changed evaluation is a new Job: the failed one never blocks the next.
    changed = copy.deepcopy(version)
    changed["spec"]["evaluation"]["gate"]["minPassRate"] = 0.4
    apply_files(kube, tmp_path, changed)
    second = wait_for_new_job(kube, "sum-v1", not_named={job["metadata"]["name"]})
    finish_eval_pod(kube, second, 0, summary(kube, "sum-v1", passed=1, failed=1))
    kube.wait(
        "sum-v1 to hold production",
        lambda: kube.status("pver", "sum-v1").get("heldLabels") == ["production"],
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("promptName", "other"),
        ("version", "2"),
        ("variables", [{"name": "question"}, {"name": "tone", "required": False}]),
        ("modelParameters", {"temperature": 0.5}),
        ("template", [{"role": "user", "content": "changed {{ question }}"}]),
    ],
)
def test_a_versions_identity_is_immutable(kube, field, value):
    original = version_file("frozen-v1", "frozen", ["canary"])
    original["spec"]["modelParameters"] = {"temperature": 0.2}
    kube.apply(original)
    edited = copy.deepcopy(original)
    edited["spec"][field] = value
    message = kube.refused(edited)
    assert f"{field} is immutable: create a new PromptVersion instead" in message
    # Labels and the evaluation are not part of the identity.
    relabelled = copy.deepcopy(original)
    relabelled["spec"]["labels"] = ["production"]
    relabelled["spec"]["evaluation"] = {
        "llmDeployment": "nowhere",
        "dataset": [{"inputs": {"question": "Hi?"}, "expect": [{"maxTokens": 8}]}],
    }
    kube.apply(relabelled)
    kube.apply(original)


def test_assertions_are_checked_at_admission(kube):
    bad = version_file("assert-v1", "assert", [])
    bad["spec"]["evaluation"] = {
        "llmDeployment": "nowhere",
        "dataset": [{"inputs": {}, "expect": [{"contains": "a", "regex": "b"}]}],
    }
    assert "set exactly one of equals, contains" in kube.refused(bad)
