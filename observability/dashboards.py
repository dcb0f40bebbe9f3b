"""The Grafana dashboards and Prometheus alerts of kvops, as code.

`python -m kvops.observability.dashboards` (`make dashboards`) writes them where the Helm chart
reads them: charts/kvops/files/dashboards/*.json (ConfigMaps labelled grafana_dashboard: "1") and
charts/kvops/files/alerts.yaml (a Prometheus rule file the chart embeds into a PrometheusRule).
`--check` fails when the committed files differ from what this module generates.

Series labels the queries rely on:
- the exporters' own: `model`, `prompt_name`, `prompt_version`, `outcome`, `rating` (worker),
  `kind`, `result`, `phase`, `namespace`, `llmdeployment`, `prompt_name`, `prompt_version`
  (operator; its `namespace` is the resource's, so its ServiceMonitor sets honorLabels);
- target labels the worker pods' scrape adds: `namespace`, `pod`, and `llmdeployment` from the
  pod label `kvops.io/llmdeployment`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvops.observability.alerts import SERVER_ERRORS, alerts_tests_yaml, alerts_yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART_FILES = REPO_ROOT / "charts" / "kvops" / "files"

WORKER = 'namespace=~"$namespace", llmdeployment=~"$deployment", model=~"$model"'
# Managed prompts only: requests without one have prompt_name "".
PROMPT = WORKER + ', prompt_name=~"$prompt", prompt_name!=""'
BY_VERSION = "prompt_name, prompt_version"
VERSION_LEGEND = "{{prompt_name}} {{prompt_version}}"
RATE = "$__rate_interval"
QUANTILES = (0.5, 0.95, 0.99)


def rate(metric: str, selector: str, by: str | None = None) -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{{{selector}}}[{RATE}]))"


def quantile(q: float, histogram: str, selector: str, by: str = "") -> str:
    """A quantile of a histogram over the rate of its buckets (never a lifetime average)."""
    grouping = ", ".join(filter(None, [by, "le"]))
    return (
        f"histogram_quantile({q}, sum by ({grouping}) "
        f"(rate({histogram}_bucket{{{selector}}}[{RATE}])))"
    )


def mean(histogram: str, selector: str, by: str) -> str:
    """Mean of the observations in the window: rate of _sum over rate of _count."""
    return f"{rate(histogram + '_sum', selector, by)} / {rate(histogram + '_count', selector, by)}"


# ------------------------------------------------------------------------------------ panels


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    description: str = ""


def percentiles(title: str, histogram: str, selector: str, description: str) -> Panel:
    return Panel(
        title,
        tuple(Query(quantile(q, histogram, selector), f"p{round(q * 100)}") for q in QUANTILES),
        unit="s",
        description=description,
    )


def overview_panels() -> list[Panel]:
    return [
        Panel(
            "Requests per second by outcome",
            (Query(rate("kvops_requests_total", WORKER, "outcome"), "{{outcome}}"),),
            unit="reqps",
        ),
        Panel(
            "Server error ratio",
            (
                Query(
                    f"{rate('kvops_requests_total', f'{WORKER}, {SERVER_ERRORS}')} / "
                    f"{rate('kvops_requests_total', WORKER)}",
                    "errors",
                ),
            ),
            unit="percentunit",
            description="Requests that failed, were rejected (overload) or timed out; "
            "invalid requests are the client's.",
        ),
        percentiles(
            "Time to first token",
            "kvops_time_to_first_token_seconds",
            WORKER,
            "From arrival to the first output token, queueing included.",
        ),
        percentiles(
            "Time per output token",
            "kvops_time_per_output_token_seconds",
            WORKER,
            "Mean time per output token after the first, per request.",
        ),
        percentiles(
            "End-to-end request latency",
            "kvops_e2e_request_latency_seconds",
            WORKER,
            "From arrival to the request's end.",
        ),
        percentiles(
            "Queue time",
            "kvops_request_queue_time_seconds",
            WORKER,
            "From arrival to first being scheduled.",
        ),
        Panel(
            "Tokens per second",
            (
                Query(rate("kvops_prompt_tokens_total", WORKER), "input (prompt)"),
                Query(rate("kvops_generation_tokens_total", WORKER), "output (generated)"),
            ),
            unit="short",
        ),
        Panel(
            "KV-cache usage",
            (Query(f"max by (pod) (kvops_kv_cache_usage_ratio{{{WORKER}}})", "{{pod}}"),),
            unit="percentunit",
            description="Share of KV-cache blocks in use, per worker pod.",
        ),
        Panel(
            "Running and waiting requests",
            (
                Query(f"sum(kvops_num_requests_running{{{WORKER}}})", "running"),
                Query(f"sum(kvops_num_requests_waiting{{{WORKER}}})", "waiting"),
            ),
        ),
        Panel(
            "Preemptions per second",
            (Query(rate("kvops_preemptions_total", WORKER), "preemptions"),),
            description="Requests preempted to free KV-cache blocks.",
        ),
        Panel(
            "Prefix-cache hit rate",
            (
                Query(
                    f"{rate('kvops_prefix_cache_hits_total', WORKER)} / "
                    f"{rate('kvops_prefix_cache_queries_total', WORKER)}",
                    "hit rate",
                ),
            ),
            unit="percentunit",
            description="Share of looked-up prompt tokens found in the prefix cache.",
        ),
    ]


def prompt_panels() -> list[Panel]:
    return [
        Panel(
            "Requests per second by prompt version",
            (Query(rate("kvops_requests_total", PROMPT, BY_VERSION), VERSION_LEGEND),),
            unit="reqps",
        ),
        Panel(
            "Server error ratio by prompt version",
            (
                Query(
                    f"{rate('kvops_requests_total', f'{PROMPT}, {SERVER_ERRORS}', BY_VERSION)}"
                    f" / {rate('kvops_requests_total', PROMPT, BY_VERSION)}",
                    VERSION_LEGEND,
                ),
            ),
            unit="percentunit",
        ),
        Panel(
            "Time to first token p95 by prompt version",
            (
                Query(
                    quantile(0.95, "kvops_time_to_first_token_seconds", PROMPT, BY_VERSION),
                    VERSION_LEGEND,
                ),
            ),
            unit="s",
        ),
        Panel(
            "End-to-end latency p95 by prompt version",
            (
                Query(
                    quantile(0.95, "kvops_e2e_request_latency_seconds", PROMPT, BY_VERSION),
                    VERSION_LEGEND,
                ),
            ),
            unit="s",
        ),
        Panel(
            "Tokens per second by prompt version",
            (
                Query(
                    rate("kvops_prompt_tokens_total", PROMPT, BY_VERSION),
                    "in " + VERSION_LEGEND,
                ),
                Query(
                    rate("kvops_generation_tokens_total", PROMPT, BY_VERSION),
                    "out " + VERSION_LEGEND,
                ),
            ),
        ),
        Panel(
            "Mean output tokens per request",
            (Query(mean("kvops_request_generation_tokens", PROMPT, BY_VERSION), VERSION_LEGEND),),
        ),
        Panel(
            "Feedback ratings per second",
            (
                Query(
                    rate("kvops_feedback_total", PROMPT, f"{BY_VERSION}, rating"),
                    VERSION_LEGEND + " {{rating}}",
                ),
            ),
            unit="reqps",
        ),
        Panel(
            "Mean feedback score",
            (Query(mean("kvops_feedback_score", PROMPT, BY_VERSION), VERSION_LEGEND),),
            description="Thumbs up 1, down 0; numeric scores as given (0-10).",
        ),
        Panel(
            "Evaluation pass rate",
            (
                Query(
                    f"max by ({BY_VERSION}) (kvops_operator_prompt_evaluation_pass_ratio"
                    '{namespace=~"$namespace", prompt_name=~"$prompt"})',
                    VERSION_LEGEND,
                ),
            ),
            unit="percentunit",
            description="The last evaluation of each PromptVersion, as the operator recorded it.",
        ),
    ]


OPERATOR_NAMESPACE = 'namespace=~"$namespace"'


def operator_panels() -> list[Panel]:
    return [
        Panel(
            "Reconciles per second",
            (
                Query(
                    f"sum by (kind, result) (rate(kvops_operator_reconciles_total[{RATE}]))",
                    "{{kind}} {{result}}",
                ),
            ),
        ),
        Panel(
            "Reconcile errors per second",
            (
                Query(
                    f"sum by (kind) (rate(kvops_operator_errors_total[{RATE}]))",
                    "{{kind}}",
                ),
            ),
        ),
        Panel(
            "Reconcile duration p95",
            (
                Query(
                    quantile(0.95, "kvops_operator_reconcile_duration_seconds", "", "kind"),
                    "{{kind}}",
                ),
            ),
            unit="s",
        ),
        Panel(
            "Resources by phase",
            (
                Query(
                    f"sum by (kind, phase) (kvops_operator_resources{{{OPERATOR_NAMESPACE}}})",
                    "{{kind}} {{phase}}",
                ),
            ),
        ),
        Panel(
            "Worker pods of each LLMDeployment",
            (
                Query(
                    f"sum by (llmdeployment) "
                    f"(kvops_operator_llmdeployment_replicas{{{OPERATOR_NAMESPACE}}})",
                    "{{llmdeployment}} pods",
                ),
                Query(
                    f"sum by (llmdeployment) "
                    f"(kvops_operator_llmdeployment_ready_replicas{{{OPERATOR_NAMESPACE}}})",
                    "{{llmdeployment}} ready",
                ),
            ),
        ),
    ]


# ------------------------------------------------------------------------------------ variables


def query_variable(name: str, label: str, query: str, title: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": title,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": f"label_values({query}, {label})", "refId": f"var-{name}"},
        "definition": f"label_values({query}, {label})",
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


DATASOURCE_VARIABLE = {
    "name": "datasource",
    "label": "Data source",
    "type": "datasource",
    "query": "prometheus",
    "current": {},
}


def worker_variables(with_prompt: bool) -> list[dict[str, Any]]:
    series = "kvops_requests_total"
    variables = [
        DATASOURCE_VARIABLE,
        query_variable("namespace", "namespace", series, "Namespace"),
        query_variable(
            "deployment", "llmdeployment", f'{series}{{namespace=~"$namespace"}}', "LLMDeployment"
        ),
        query_variable(
            "model",
            "model",
            f'{series}{{namespace=~"$namespace", llmdeployment=~"$deployment"}}',
            "Model",
        ),
    ]
    if with_prompt:
        variables.append(
            query_variable(
                "prompt",
                "prompt_name",
                f'{series}{{namespace=~"$namespace", llmdeployment=~"$deployment", '
                'prompt_name!=""}',
                "Prompt",
            )
        )
    return variables


def operator_variables() -> list[dict[str, Any]]:
    return [
        DATASOURCE_VARIABLE,
        query_variable("namespace", "namespace", "kvops_operator_resources", "Namespace"),
    ]


# ------------------------------------------------------------------------------------ dashboards


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]
    variables: tuple[dict[str, Any], ...]


def dashboards() -> dict[str, Dashboard]:
    """File name (under files/dashboards/) -> dashboard."""
    return {
        "kvops-overview.json": Dashboard(
            "kvops-overview",
            "kvops / Overview",
            "Traffic, latency, tokens and the engine's KV cache of kvops workers.",
            tuple(overview_panels()),
            tuple(worker_variables(with_prompt=False)),
        ),
        "kvops-prompts.json": Dashboard(
            "kvops-prompts",
            "kvops / Prompts",
            "Managed prompts by version: traffic, latency, tokens, feedback and evaluations.",
            tuple(prompt_panels()),
            tuple(worker_variables(with_prompt=True)),
        ),
        "kvops-operator.json": Dashboard(
            "kvops-operator",
            "kvops / Operator",
            "The kvops operator's reconciles, errors and the resources it manages.",
            tuple(operator_panels()),
            tuple(operator_variables()),
        ),
    }


PANEL_WIDTH, PANEL_HEIGHT, COLUMNS = 12, 8, 2


def dashboard_json(dashboard: Dashboard) -> dict[str, Any]:
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    panels = []
    for index, panel in enumerate(dashboard.panels):
        panels.append(
            {
                "id": index + 1,
                "type": "timeseries",
                "title": panel.title,
                "description": panel.description,
                "datasource": datasource,
                "gridPos": {
                    "h": PANEL_HEIGHT,
                    "w": PANEL_WIDTH,
                    "x": (index % COLUMNS) * PANEL_WIDTH,
                    "y": (index // COLUMNS) * PANEL_HEIGHT,
                },
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [
                    {
                        "refId": chr(ord("A") + n),
                        "datasource": datasource,
                        "expr": query.expr,
                        "legendFormat": query.legend,
                    }
                    for n, query in enumerate(panel.queries)
                ],
            }
        )
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["kvops"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "templating": {"list": list(dashboard.variables)},
        "annotations": {"list": []},
        "panels": panels,
    }


# ------------------------------------------------------------------------------------ queries


def dashboard_queries(dashboard: Dashboard) -> Iterator[tuple[str, str]]:
    """(panel title, expression) of every query of a dashboard, variables' queries included."""
    for panel in dashboard.panels:
        for query in panel.queries:
            yield panel.title, query.expr
    for variable in dashboard.variables:
        if variable["type"] == "query":
            # label_values(series, label) is Grafana's; the series selector is the PromQL part.
            series = variable["definition"][len("label_values(") :].rsplit(",", 1)[0]
            yield f"variable {variable['name']}", series


def substitute(expr: str, values: dict[str, str]) -> str:
    """The expression with Grafana's variables replaced (longest names first)."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(f"${{{name}}}", values[name]).replace(f"${name}", values[name])
    return expr


# ------------------------------------------------------------------------------------ files


def generated_files() -> dict[Path, str]:
    files = {
        CHART_FILES / "dashboards" / name: json.dumps(dashboard_json(d), indent=2) + "\n"
        for name, d in dashboards().items()
    }
    files[CHART_FILES / "alerts.yaml"] = alerts_yaml()
    files[CHART_FILES / "alerts-tests.yaml"] = alerts_tests_yaml()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="fail if the committed files are not up to date"
    )
    args = parser.parse_args(argv)
    stale = []
    for path, text in generated_files().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(str(path.relative_to(REPO_ROOT)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO_ROOT)}")
    if stale:
        print(
            "stale (run `make dashboards`): " + ", ".join(stale),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
