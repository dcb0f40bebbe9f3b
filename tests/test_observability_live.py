"""Every dashboard query and alert rule over the worker's metrics returns data from a real
Prometheus (Debian's) scraping a real `kvops serve` (the built-in SmolLM2) under a short, bounded
load through the `openai` client (tests/observability_load.py): plain and streamed chats, two
managed prompt versions, timed-out and invalid requests, feedback. The Overview and Prompts
dashboards are drawn from the same Prometheus (KVOPS_DASHBOARD_PNG_DIR keeps the pictures).

The operator's series (kvops_operator_*) come from a real operator in
e2e/test_observability_cluster.py, which runs every query of every dashboard at once."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from observability_load import draw, load_and_scrape, queries, without_data
from prometheus_process import PROMETHEUS, PrometheusProcess, ScrapeTarget
from serve_process import ServeProcess

from kvops.observability import dashboards as generator

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None, reason="needs Debian's prometheus (make host-deps)"),
]

# The target labels a PodMonitor adds to a worker pod's series.
TARGET = {"namespace": "shop", "llmdeployment": "chat", "pod": "chat-5d8f-x2x7q"}
SELECTOR = 'namespace="shop", llmdeployment="chat"'


def prompt_version(number: str, system: str) -> dict:
    """A version as the operator writes it into prompts.json."""
    return {
        "promptVersion": f"support-v{number}",
        "version": number,
        "contentHash": f"sha256:{number * 64}"[:71],
        "template": [
            {"role": "system", "content": system},
            {"role": "user", "content": "{{ question }}"},
        ],
        "variables": [{"name": "question", "required": True, "default": None, "description": None}],
        "modelParameters": {"temperature": 0.0, "topP": None, "maxTokens": 6, "stop": []},
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("live")
    (folder / "prompts").mkdir()
    versions = {"1": prompt_version("1", "Answer briefly."), "2": prompt_version("2", "Rhyme.")}
    prompts = {"support": {"labels": {"production": "1"}, "versions": versions}}
    document = {"prompts": prompts, "unresolved": []}
    (folder / "prompts" / "prompts.json").write_text(json.dumps(document))
    args = ("--prompts-dir", str(folder / "prompts"), "--feedback-log", str(folder / "fb.jsonl"))
    with ServeProcess(*args) as server:
        yield server


@pytest.fixture(scope="module")
def prometheus(server):
    target = ScrapeTarget(f"127.0.0.1:{server.http_port}", TARGET)
    with PrometheusProcess({"kvops-worker": target}) as prometheus:
        prometheus.wait_for('up{job="kvops-worker"} == 1')
        yield prometheus


def test_every_worker_dashboard_query_and_alert_returns_data(server, prometheus, tmp_path):
    started = time.time()
    load = load_and_scrape(server, prometheus, SELECTOR, "support", ("1", "2"))
    variables = {
        "namespace": TARGET["namespace"],
        "deployment": TARGET["llmdeployment"],
        "model": load.model,
        "prompt": "support",
        # Grafana's $__rate_interval is at least four scrapes; the load took less than this.
        "__rate_interval": "3m",
    }
    chosen = queries(variables, operator=False, worker=True)
    assert len(chosen) > 25
    empty = without_data(prometheus, chosen)
    assert not empty, "no data for:\n" + "\n".join(empty)

    # The prompts view tells the versions apart.
    per_version = prometheus.query(
        generator.substitute(
            generator.rate("kvops_requests_total", generator.PROMPT, generator.BY_VERSION),
            variables,
        )
    )
    assert {s["metric"]["prompt_version"] for s in per_version} == {"1", "2"}

    keep = os.environ.get("KVOPS_DASHBOARD_PNG_DIR")
    folders = [tmp_path] + ([Path(keep)] if keep else [])
    names = ["kvops-overview.json", "kvops-prompts.json"]
    draw(prometheus, names, variables, started - 5, folders, skip_operator=True)
