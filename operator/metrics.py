"""The operator's own Prometheus metrics (prefix kvops_operator_)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

RECONCILES = Counter(
    "kvops_operator_reconciles_total", "Reconciliations by kind and result", ["kind", "result"]
)
ERRORS = Counter("kvops_operator_errors_total", "Reconciliations that raised", ["kind"])
DURATION = Histogram(
    "kvops_operator_reconcile_duration_seconds",
    "Time to reconcile one object",
    ["kind"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
# Error series exist from the start at 0, so that rate() sees the first error and the alert on
# reconcile errors has a series to evaluate.
for _kind in ("LLMDeployment", "PromptVersion", "VectorIndex"):
    RECONCILES.labels(_kind, "error")
    ERRORS.labels(_kind)


@contextmanager
def measured(kind: str) -> Iterator[None]:
    """Count and time one reconciliation; an exception counts as an error and propagates."""
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        RECONCILES.labels(kind, "error").inc()
        ERRORS.labels(kind).inc()
        raise
    else:
        RECONCILES.labels(kind, "success").inc()
    finally:
        DURATION.labels(kind).observe(time.perf_counter() - start)


class ResourceStatusCollector(Collector):
    """Gauges of what the operator last wrote into each resource's status: resources by phase,
    an LLMDeployment's worker pods and ready ones, a PromptVersion's evaluation pass rate.

    Fed by `kube.patch_status`, so the figures are exactly the statuses users read; an object is
    forgotten when a reconcile finds it gone or being deleted. The `namespace` label is the
    resource's own (the operator's ServiceMonitor keeps it with honorLabels).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str, str], str] = {}
        self._replicas: dict[tuple[str, str], tuple[int, int]] = {}
        self._pass_rates: dict[tuple[str, str, str], float] = {}
        self._prompt_of: dict[tuple[str, str], tuple[str, str]] = {}

    def observe(self, obj: dict[str, Any], status: dict[str, Any]) -> None:
        """Record the fields of a status patch (a patch may carry only some of them)."""
        kind, namespace, name = _identity(obj)
        with self._lock:
            if "phase" in status:
                self._phases[(kind, namespace, name)] = status["phase"]
            elif "valid" in status:  # a PromptVersion has no phase: its validity stands for one
                self._phases[(kind, namespace, name)] = "Valid" if status["valid"] else "Invalid"
            if kind == "LLMDeployment" and "readyReplicas" in status:
                self._replicas[(namespace, name)] = (
                    int(status.get("replicas", 0)),
                    int(status["readyReplicas"]),
                )
            # A status patch may leave the evaluation out (only labels); the object still has it.
            evaluation = status.get("lastEvaluation") or (obj.get("status") or {}).get(
                "lastEvaluation"
            )
            if kind == "PromptVersion" and evaluation and "passRate" in evaluation:
                spec = obj.get("spec") or {}
                prompt = (str(spec.get("promptName", "")), str(spec.get("version", "")))
                self._prompt_of[(namespace, name)] = prompt
                self._pass_rates[(namespace, *prompt)] = float(evaluation["passRate"])

    def forget(self, obj: dict[str, Any]) -> None:
        kind, namespace, name = _identity(obj)
        with self._lock:
            self._phases.pop((kind, namespace, name), None)
            if kind == "LLMDeployment":
                self._replicas.pop((namespace, name), None)
            if kind == "PromptVersion" and (namespace, name) in self._prompt_of:
                self._pass_rates.pop((namespace, *self._prompt_of.pop((namespace, name))), None)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        with self._lock:
            phases = list(self._phases.items())
            replicas = list(self._replicas.items())
            pass_rates = list(self._pass_rates.items())
        by_phase = GaugeMetricFamily(
            "kvops_operator_resources",
            "Resources by kind and the phase of their last status (PromptVersion: Valid/Invalid)",
            labels=["kind", "namespace", "phase"],
        )
        counts: dict[tuple[str, str, str], int] = {}
        for (kind, namespace, _), phase in phases:
            counts[(kind, namespace, phase)] = counts.get((kind, namespace, phase), 0) + 1
        for labels, count in sorted(counts.items()):
            by_phase.add_metric(list(labels), count)
        yield by_phase
        pods = GaugeMetricFamily(
            "kvops_operator_llmdeployment_replicas",
            "Worker pods of an LLMDeployment (its status.replicas)",
            labels=["namespace", "llmdeployment"],
        )
        ready = GaugeMetricFamily(
            "kvops_operator_llmdeployment_ready_replicas",
            "Ready worker pods of an LLMDeployment (its status.readyReplicas)",
            labels=["namespace", "llmdeployment"],
        )
        for (namespace, name), (total, ready_count) in sorted(replicas):
            pods.add_metric([namespace, name], total)
            ready.add_metric([namespace, name], ready_count)
        yield pods
        yield ready
        rates = GaugeMetricFamily(
            "kvops_operator_prompt_evaluation_pass_ratio",
            "Pass rate (0-1) of a prompt version's last evaluation",
            labels=["namespace", "prompt_name", "prompt_version"],
        )
        for labels, rate in sorted(pass_rates):
            rates.add_metric(list(labels), rate)
        yield rates


def _identity(obj: dict[str, Any]) -> tuple[str, str, str]:
    metadata = obj["metadata"]
    return obj["kind"], metadata.get("namespace", ""), metadata["name"]


RESOURCE_STATUS = ResourceStatusCollector()
REGISTRY.register(RESOURCE_STATUS)
