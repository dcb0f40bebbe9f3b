"""The Grafana dashboards and alert rules query only what the exporters define, the way
Prometheus means it: quantiles over rate() of _bucket, means over rate() of _sum and _count,
counters by their _total name and only through rate(); the committed files are what
observability/dashboards.py generates."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry

from kvops.observability import alerts as alert_rules
from kvops.observability import dashboards as generator
from kvops.operator import metrics as operator_metrics
from kvops.worker.request import EngineStats
from kvops.worker.serve.telemetry import (
    FEEDBACK_METRIC_NAMES,
    METRIC_NAMES,
    RAG_METRIC_NAMES,
    ServingMetrics,
)

METRIC = re.compile(r"\bkvops_[a-z0-9_]+")


def series_names(registry: CollectorRegistry) -> dict[str, str]:
    """Every series name a registry exposes -> the type of its family."""
    names = {}
    for family in registry.collect():
        if family.type == "counter":
            names[family.name + "_total"] = "counter"
        elif family.type == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                names[family.name + suffix] = "histogram"
        else:
            names[family.name] = family.type
    return names


@pytest.fixture(scope="module")
def exported() -> dict[str, str]:
    stats = EngineStats(0, 0, 0.0, 0, 0, 0)
    worker = series_names(ServingMetrics("m", lambda: stats).registry)
    # The worker's own list of what it serves agrees with its registry.
    families = {
        re.sub(r"_(total|bucket|sum|count)$", "", name) if kind != "gauge" else name
        for name, kind in worker.items()
    }
    assert {
        n.removesuffix("_total") for n in METRIC_NAMES + FEEDBACK_METRIC_NAMES + RAG_METRIC_NAMES
    } <= families
    operator = {n: k for n, k in series_names(REGISTRY).items() if n.startswith("kvops_operator_")}
    assert operator_metrics.RESOURCE_STATUS is not None and operator
    return worker | operator


def all_expressions() -> Iterator[tuple[str, str]]:
    for name, dashboard in generator.dashboards().items():
        for title, expr in generator.dashboard_queries(dashboard):
            yield f"{name}: {title}", expr
    for alert in alert_rules.alerts():
        yield f"alert {alert.name}", alert.expr


EXPRESSIONS = list(all_expressions())


def test_every_dashboard_and_alert_has_queries():
    names = {where.split(":")[0] for where, _ in EXPRESSIONS}
    assert {"kvops-overview.json", "kvops-prompts.json", "kvops-operator.json"} <= names
    assert len(EXPRESSIONS) > 30


@pytest.mark.parametrize(("where", "expr"), EXPRESSIONS, ids=[w for w, _ in EXPRESSIONS])
def test_queries_use_only_exported_series_as_prometheus_means_them(where, expr, exported):
    used = list(METRIC.finditer(expr))
    assert used, f"{where}: queries no kvops metric: {expr}"
    for match in used:
        name = match.group()
        assert name in exported, f"{where}: {name} is not exported by the worker or operator"
        # A variable lists label values of any series; a panel or alert reads counters, buckets,
        # sums and counts only through rate().
        cumulative = exported[name] == "counter" or name.endswith(("_bucket", "_sum", "_count"))
        if cumulative and not where.split(": ")[-1].startswith("variable "):
            assert expr[: match.start()].endswith("rate("), f"{where}: {name} outside rate()"
    for call in re.finditer(r"histogram_quantile\(", expr):
        inner = expr[call.end() :]
        assert re.match(r"[0-9.]+, sum by \([a-z_, ]*\ble\) \(rate\(kvops_\w+_bucket", inner), (
            f"{where}: a quantile must be over rate() of _bucket summed by le: {expr}"
        )


def test_queries_only_use_variables_their_dashboard_defines():
    for name, dashboard in generator.dashboards().items():
        defined = {v["name"] for v in dashboard.variables} | {"__rate_interval"}
        for title, expr in generator.dashboard_queries(dashboard):
            used = set(re.findall(r"\$\{?(\w+)", expr))
            assert used <= defined, f"{name}: {title} uses undefined {used - defined}"


def test_dashboard_json_is_what_grafana_loads():
    for name, dashboard in generator.dashboards().items():
        document = generator.dashboard_json(dashboard)
        assert document["uid"] and len(document["uid"]) <= 40
        ids = [panel["id"] for panel in document["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in document["panels"]:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            ref_ids = [target["refId"] for target in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), f"{name}: {panel['title']}"
        # No two panels overlap on Grafana's 24-column grid.
        cells = set()
        for panel in document["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24
            for x in range(pos["x"], pos["x"] + pos["w"]):
                for y in range(pos["y"], pos["y"] + pos["h"]):
                    assert (x, y) not in cells, f"{name}: {panel['title']} overlaps"
                    cells.add((x, y))


def test_every_alert_has_a_summary_a_runbook_and_a_firing_and_resolving_test():
    rules = yaml.safe_load((generator.CHART_FILES / "alerts.yaml").read_text())
    (group,) = rules["groups"]
    names = {rule["alert"] for rule in group["rules"]}
    assert names == {
        "KvopsHighTimeToFirstToken",
        "KvopsHighErrorRate",
        "KvopsKVCacheSaturated",
        "KvopsRequestsQueuedTooLong",
        "KvopsWorkersNotReady",
        "KvopsOperatorReconcileErrors",
    }
    for rule in group["rules"]:
        assert rule["annotations"]["summary"] and len(rule["annotations"]["runbook"]) > 40
        assert rule["labels"]["severity"] in ("warning", "critical")
    tests = yaml.safe_load((generator.CHART_FILES / "alerts-tests.yaml").read_text())["tests"]
    for name in names:
        checks = [
            check
            for test in tests
            for check in test["alert_rule_test"]
            if check["alertname"] == name
        ]
        assert any(check["exp_alerts"] for check in checks), f"{name} never fires in a test"
        assert any(not check["exp_alerts"] for check in checks), f"{name} never resolves"


def test_substitute_replaces_grafana_variables():
    expr = 'sum(rate(x{namespace=~"$namespace", pod=~"${pod}"}[$__rate_interval]))'
    assert (
        generator.substitute(expr, {"namespace": "a", "pod": "b", "__rate_interval": "1m"})
        == 'sum(rate(x{namespace=~"a", pod=~"b"}[1m]))'
    )


def test_committed_files_are_generated(capsys):
    assert generator.main(["--check"]) == 0, capsys.readouterr().err
    for path, text in generator.generated_files().items():
        if path.suffix == ".json":
            assert json.loads(text)["panels"]


def test_check_names_a_stale_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generator, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(generator, "CHART_FILES", tmp_path / "files")
    assert generator.main(["--check"]) == 1
    assert "files/alerts.yaml" in capsys.readouterr().err
    assert generator.main([]) == 0
    assert generator.main(["--check"]) == 0
