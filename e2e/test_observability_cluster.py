"""Every query of every dashboard and every alert rule returns data from one real Prometheus that
scrapes a real `kvops operator` (against the control plane with kwok's nodes, under its own
Role) and a real `kvops serve` on this host serving the prompts.json the operator rendered.

The operator reconciles an LLMDeployment (Available on kwok) and two PromptVersions whose
evaluation Jobs are completed the way a kubelet would (kwok runs no container; as in
test_operator_prompts.py), so resources by phase, worker replicas and evaluation pass rates are
the operator's own figures. The worker is scraped with the target labels a PodMonitor gives a
worker pod (namespace, pod, llmdeployment); the operator with honor_labels, as its
ServiceMonitor must, so that its `namespace` label names the resources' namespace. With
KVOPS_DASHBOARD_PNG_DIR set, the pictures of all three dashboards are drawn there.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from observability_load import draw, load_and_scrape, queries, without_data
from prometheus_process import PrometheusProcess, ScrapeTarget
from serve_process import ServeProcess
from test_operator_cluster import (
    Kube,
    llmd,
    operator_under_its_role,
    pods_running,
    restricted_namespace,
)
from test_operator_prompts import finish_eval_pod, summary, version_file, wait_for_new_job

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

DEPLOYMENT, PROMPT = "obs-bot", "obs"
# passed, failed of each version's evaluation
RESULTS = {"obs-v1": (3, 1), "obs-v2": (4, 0)}


@pytest.fixture(scope="module")
def namespace(kube_cluster):
    """Restricted Pod Security, as the evaluation Jobs must pass it."""
    with restricted_namespace(kube_cluster, "kvops-obs") as name:
        yield name


@pytest.fixture(scope="module")
def kube(kube_cluster, namespace, tmp_path_factory):
    folder = tmp_path_factory.mktemp("operator")
    with operator_under_its_role(kube_cluster, namespace, folder) as operator:
        yield Kube(kube_cluster, namespace, operator)


def evaluated_prompts(kube: Kube, folder: Path) -> Path:
    """An Available LLMDeployment serving two evaluated versions; the prompts.json the
    operator rendered for it, in a folder a worker reads."""
    kube.apply(llmd(DEPLOYMENT, prompts=[{"name": PROMPT}]))
    kube.wait_available(DEPLOYMENT, 1)
    versions = {
        "obs-v1": version_file("obs-v1", PROMPT, ["production"], gate=0.5),
        "obs-v2": version_file("obs-v2", PROMPT, [], gate=0.5),
    }
    for name, version in versions.items():
        kube.apply(version)
        job = wait_for_new_job(kube, name)
        finish_eval_pod(kube, job, 0, summary(kube, name, *RESULTS[name]))
        kube.wait(
            f"{name}'s evaluation", lambda n=name: kube.status("pver", n).get("lastEvaluation")
        )

    def both_served():
        data = (kube.get("configmap", f"{DEPLOYMENT}-prompts") or {}).get("data", {})
        document = json.loads(data.get("prompts.json", "{}"))
        served = document.get("prompts", {}).get(PROMPT, {}).get("versions", {})
        return data["prompts.json"] if {"v1", "v2"} <= set(served) else None

    prompts = folder / "prompts"
    prompts.mkdir()
    (prompts / "prompts.json").write_text(kube.wait("both versions served", both_served))
    return prompts


def test_every_dashboard_and_alert_query_returns_data(kube, tmp_path):
    started = time.time()
    prompts = evaluated_prompts(kube, tmp_path)
    pod = pods_running(kube, DEPLOYMENT)[0]
    worker_labels = {
        "namespace": kube.namespace,
        "llmdeployment": DEPLOYMENT,
        "pod": pod["metadata"]["name"],
    }
    args = ("--prompts-dir", str(prompts), "--feedback-log", str(tmp_path / "feedback.jsonl"))
    with ServeProcess(*args) as server:
        targets = {
            "kvops-worker": ScrapeTarget(f"127.0.0.1:{server.http_port}", worker_labels),
            "kvops-operator": ScrapeTarget(
                f"127.0.0.1:{kube.operator.metrics_port}",
                {"namespace": "kvops-system"},
                honor_labels=True,
            ),
        }
        with PrometheusProcess(targets) as prometheus:
            prometheus.wait_for("count(up == 1) == 2")
            # Every reconcile so far came before the first scrape; one more (a version no
            # deployment uses) gives the duration histogram an increase rate() can see.
            kube.apply(version_file("unused-v1", "unused", []))
            prometheus.wait_for(
                "sum(increase(kvops_operator_reconcile_duration_seconds_count[1m])) > 0"
            )
            selector = f'namespace="{kube.namespace}", llmdeployment="{DEPLOYMENT}"'
            load = load_and_scrape(server, prometheus, selector, PROMPT, ("v1", "v2"))
            ratios = prometheus.wait_for(
                f'kvops_operator_prompt_evaluation_pass_ratio{{namespace="{kube.namespace}"}}'
            )
            assert {r["metric"]["prompt_version"]: float(r["value"][1]) for r in ratios} == {
                "v1": 0.75,
                "v2": 1.0,
            }
            ready = prometheus.wait_for(
                f'kvops_operator_llmdeployment_ready_replicas{{llmdeployment="{DEPLOYMENT}"}}'
            )
            assert [r["metric"]["namespace"] for r in ready] == [kube.namespace]
            variables = {
                "namespace": kube.namespace,
                "deployment": DEPLOYMENT,
                "model": load.model,
                "prompt": PROMPT,
                "__rate_interval": "3m",
            }
            chosen = queries(variables, operator=True, worker=True)
            empty = without_data(prometheus, chosen)
            assert not empty, "no data for:\n" + "\n".join(empty)

            keep = os.environ.get("KVOPS_DASHBOARD_PNG_DIR")
            folders = [tmp_path] + ([Path(keep)] if keep else [])
            names = ["kvops-overview.json", "kvops-prompts.json", "kvops-operator.json"]
            draw(prometheus, names, variables, started - 5, folders)
