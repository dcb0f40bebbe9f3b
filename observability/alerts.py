"""kvops' Prometheus alerts and the promtool unit tests that fire and resolve each of them.

Written by `make dashboards` as charts/kvops/files/alerts.yaml (a rule file the chart embeds into a
PrometheusRule) and alerts-tests.yaml (`promtool test rules`, tests/test_prometheus_rules.py).
The runbook line of each alert is its `runbook` annotation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

# Outcomes of kvops_requests_total that are the server's fault (invalid is the client's, aborted
# its cancellation).
SERVER_ERRORS = 'outcome=~"error|timeout|rejected"'


@dataclass(frozen=True)
class Alert:
    name: str
    # The measured quantity; the rule fires while `query op threshold` holds for `for_`.
    query: str
    op: str
    threshold: float
    for_: str
    severity: str
    summary: str
    runbook: str

    @property
    def expr(self) -> str:
        return f"{self.query} {self.op} {self.threshold:g}"


DEPLOYMENT = "namespace, llmdeployment"


def alerts() -> list[Alert]:
    return [
        Alert(
            "KvopsHighTimeToFirstToken",
            "histogram_quantile(0.95, sum by (namespace, llmdeployment, model, le) "
            "(rate(kvops_time_to_first_token_seconds_bucket[5m])))",
            ">",
            2,
            "10m",
            "warning",
            "p95 time to first token of {{ $labels.llmdeployment }} is "
            "{{ $value | humanizeDuration }}",
            "Check the Overview dashboard's queue time and KV-cache usage: queueing means too "
            "few replicas (raise replicas or the autoscaler's max); long prompts mean prefill "
            "dominates (lower spec.engine.maxNumBatchedTokens or add GPUs).",
        ),
        Alert(
            "KvopsHighErrorRate",
            f"sum by ({DEPLOYMENT}) (rate(kvops_requests_total{{{SERVER_ERRORS}}}[5m])) / "
            f"sum by ({DEPLOYMENT}) (rate(kvops_requests_total[5m]))",
            ">",
            0.05,
            "5m",
            "critical",
            "{{ $value | humanizePercentage }} of requests to {{ $labels.llmdeployment }} fail",
            "Split kvops_requests_total by outcome: rejected means overload (scale out), "
            "timeout means requests outlive their deadline, error means worker failures "
            "(read the worker pods' logs and `kubectl describe llmd`).",
        ),
        Alert(
            "KvopsKVCacheSaturated",
            f"max by ({DEPLOYMENT}, pod) (kvops_kv_cache_usage_ratio)",
            ">",
            0.95,
            "10m",
            "warning",
            "KV cache of {{ $labels.pod }} is {{ $value | humanizePercentage }} full",
            "A full KV cache preempts requests and queues new ones: add replicas, lower "
            "spec.engine.maxModelLen or maxNumSeqs, or give the workers larger GPUs.",
        ),
        Alert(
            "KvopsRequestsQueuedTooLong",
            "histogram_quantile(0.95, sum by (namespace, llmdeployment, le) "
            "(rate(kvops_request_queue_time_seconds_bucket[5m])))",
            ">",
            5,
            "10m",
            "warning",
            "p95 queue time of {{ $labels.llmdeployment }} is {{ $value | humanizeDuration }}",
            "Requests wait for a batch slot: scale out (replicas or autoscaling.maxReplicas) "
            "or raise spec.engine.maxNumSeqs if the KV cache has room.",
        ),
        Alert(
            "KvopsWorkersNotReady",
            f"max by ({DEPLOYMENT}) (kvops_operator_llmdeployment_replicas) - "
            f"max by ({DEPLOYMENT}) (kvops_operator_llmdeployment_ready_replicas)",
            ">",
            0,
            "15m",
            "warning",
            "{{ $value }} worker pods of {{ $labels.llmdeployment }} are not ready",
            "`kubectl describe llmd` says why in its Degraded condition (scheduling, image "
            "pull, model pull, crash); a model still loading needs a larger "
            "startupTimeoutSeconds.",
        ),
        Alert(
            "KvopsOperatorReconcileErrors",
            "sum by (kind) (rate(kvops_operator_errors_total[10m]))",
            ">",
            0,
            "15m",
            "warning",
            "The kvops operator keeps failing to reconcile {{ $labels.kind }} resources",
            "Read the operator's log for the handler's traceback; kopf retries with back-off, "
            "so a lasting error usually means missing RBAC or an unreachable API server.",
        ),
    ]


def alerts_yaml() -> str:
    rules = [
        {
            "alert": alert.name,
            "expr": alert.expr,
            "for": alert.for_,
            "labels": {"severity": alert.severity},
            "annotations": {"summary": alert.summary, "runbook": alert.runbook},
        }
        for alert in alerts()
    ]
    return _dump({"groups": [{"name": "kvops", "rules": rules}]})


def _dump(document: dict[str, Any]) -> str:
    header = "# Generated by observability/dashboards.py (make dashboards); do not edit.\n"
    return header + yaml.safe_dump(document, sort_keys=False, width=1000)


# ------------------------------------------------------------------------------------ promtool


@dataclass(frozen=True)
class Scenario:
    """Series that make `alert` fire at FIRING_AT and stop by RESOLVED_AT (1-minute samples)."""

    alert: str
    series: dict[str, str]
    labels: dict[str, str]
    summary: str  # the rendered summary annotation
    extra: dict[str, str] = field(default_factory=dict)


FIRING_AT, RESOLVED_AT = "25m", "55m"
WORKER_LABELS = 'namespace="shop", llmdeployment="chat", model="smollm2", pod="chat-0"'


def _slow_then_fast(histogram: str, slow_le: str) -> dict[str, str]:
    """Ten observations a minute: for 30 minutes all between 1 s and `slow_le`, then all <= 1 s."""
    return {
        f'{histogram}_bucket{{{WORKER_LABELS}, le="1"}}': "0+0x30 10+10x30",
        f'{histogram}_bucket{{{WORKER_LABELS}, le="{slow_le}"}}': "0+10x60",
        f'{histogram}_bucket{{{WORKER_LABELS}, le="+Inf"}}': "0+10x60",
    }


def scenarios() -> list[Scenario]:
    deployment = {"namespace": "shop", "llmdeployment": "chat"}
    return [
        Scenario(
            "KvopsHighTimeToFirstToken",
            _slow_then_fast("kvops_time_to_first_token_seconds", "5"),
            {**deployment, "model": "smollm2", "severity": "warning"},
            # p95 inside the (1, 5] bucket: 1 + 4 * 0.95
            "p95 time to first token of chat is 4.8s",
        ),
        Scenario(
            "KvopsHighErrorRate",
            {
                f'kvops_requests_total{{{WORKER_LABELS}, outcome="success"}}': "0+10x60",
                f'kvops_requests_total{{{WORKER_LABELS}, outcome="error"}}': "0+5x30 150x30",
                f'kvops_requests_total{{{WORKER_LABELS}, outcome="invalid"}}': "0+20x60",
            },
            {**deployment, "severity": "critical"},
            # 5 errors of 35 requests a minute; invalid requests count in the total only
            "14.29% of requests to chat fail",
        ),
        Scenario(
            "KvopsKVCacheSaturated",
            {f"kvops_kv_cache_usage_ratio{{{WORKER_LABELS}}}": "0.99x30 0.5x30"},
            {**deployment, "pod": "chat-0", "severity": "warning"},
            "KV cache of chat-0 is 99% full",
        ),
        Scenario(
            "KvopsRequestsQueuedTooLong",
            _slow_then_fast("kvops_request_queue_time_seconds", "10"),
            {**deployment, "severity": "warning"},
            "p95 queue time of chat is 9.55s",
        ),
        Scenario(
            "KvopsWorkersNotReady",
            {
                'kvops_operator_llmdeployment_replicas{namespace="shop", llmdeployment="chat"}': (
                    "2x60"
                ),
                'kvops_operator_llmdeployment_ready_replicas{namespace="shop", '
                'llmdeployment="chat"}': "1x30 2x30",
            },
            {**deployment, "severity": "warning"},
            "1 worker pods of chat are not ready",
        ),
        Scenario(
            "KvopsOperatorReconcileErrors",
            {'kvops_operator_errors_total{kind="LLMDeployment"}': "0+1x30 30x30"},
            {"kind": "LLMDeployment", "severity": "warning"},
            "The kvops operator keeps failing to reconcile LLMDeployment resources",
        ),
    ]


def alerts_tests_yaml() -> str:
    runbooks = {alert.name: alert.runbook for alert in alerts()}
    tests = []
    for scenario in scenarios():
        firing = {
            "exp_labels": scenario.labels,
            "exp_annotations": {"summary": scenario.summary, "runbook": runbooks[scenario.alert]},
        }
        tests.append(
            {
                "name": scenario.alert,
                "interval": "1m",
                "input_series": [
                    {"series": series, "values": values}
                    for series, values in scenario.series.items()
                ],
                "alert_rule_test": [
                    {"eval_time": FIRING_AT, "alertname": scenario.alert, "exp_alerts": [firing]},
                    {"eval_time": RESOLVED_AT, "alertname": scenario.alert, "exp_alerts": []},
                ],
            }
        )
    return _dump({"rule_files": ["alerts.yaml"], "evaluation_interval": "1m", "tests": tests})
