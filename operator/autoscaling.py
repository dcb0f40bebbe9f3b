"""The autoscaler of an LLMDeployment (pure rendering): an HPA that reads the worker's gauges
through custom.metrics.k8s.io (prometheus-adapter serves them), or, with provider KEDA, a
ScaledObject whose Prometheus trigger queries them. Either scales the LLMDeployment itself
through its scale subresource; the Deployment follows `spec.replicas`."""

from __future__ import annotations

import os
from typing import Any

from kvops.operator.api import API_VERSION, Autoscaling

# Per-pod gauges the worker exports (kvops.worker.serve.telemetry). prometheus-adapter serves
# them under these same names (charts/kvops/templates/autoscaling/).
AUTOSCALING_METRICS = {
    "queueDepth": "kvops_num_requests_waiting",
    "kvCacheUsage": "kvops_kv_cache_usage_ratio",
}
DEFAULT_TARGETS: dict[str, int | str] = {"queueDepth": 8, "kvCacheUsage": "80%"}
HPA_API = ("autoscaling/v2", "HorizontalPodAutoscaler")
KEDA_API = ("keda.sh/v1alpha1", "ScaledObject")
# Where KEDA's Prometheus trigger queries: the operator's Deployment sets KVOPS_PROMETHEUS_URL
# (the chart from autoscaling.prometheusUrl); the default is the Prometheus Operator's Service.
DEFAULT_PROMETHEUS_URL = "http://prometheus-operated.monitoring.svc:9090"
PROMETHEUS_URL = os.environ.get("KVOPS_PROMETHEUS_URL", DEFAULT_PROMETHEUS_URL)


def target_quantity(autoscaling: Autoscaling) -> str:
    """The per-pod target as a Kubernetes quantity: a count, or a KV-cache fraction in
    thousandths ('80%' and '0.8' are both 800m)."""
    target = (
        DEFAULT_TARGETS[autoscaling.metric] if autoscaling.target is None else autoscaling.target
    )
    if autoscaling.metric == "queueDepth":
        return str(int(target))
    text = str(target)
    if text.endswith("%"):
        return f"{int(text[:-1]) * 10}m"
    return f"{round(float(text) * 1000)}m"


def _scale_down(autoscaling: Autoscaling) -> dict[str, Any]:
    window = autoscaling.scale_down_stabilization_seconds
    return {"scaleDown": {"stabilizationWindowSeconds": window}}


def render_hpa(metadata: dict[str, Any], autoscaling: Autoscaling) -> dict[str, Any]:
    name = metadata["name"]
    return {
        "apiVersion": HPA_API[0],
        "kind": HPA_API[1],
        "metadata": metadata,
        "spec": {
            "scaleTargetRef": {"apiVersion": API_VERSION, "kind": "LLMDeployment", "name": name},
            "minReplicas": autoscaling.min_replicas,
            "maxReplicas": autoscaling.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": AUTOSCALING_METRICS[autoscaling.metric]},
                        "target": {
                            "type": "AverageValue",
                            "averageValue": target_quantity(autoscaling),
                        },
                    },
                }
            ],
            "behavior": _scale_down(autoscaling),
        },
    }


def prometheus_query(metric: str, namespace: str, name: str) -> str:
    """The gauge summed over the deployment's pods (`<name>-<replicaset hash>-<suffix>`); KEDA
    divides the sum by the replicas, so the target stays an average per pod as with the HPA."""
    pods = f"{name}-[a-z0-9]+-[a-z0-9]+"
    return f'sum({metric}{{namespace="{namespace}",pod=~"{pods}"}})'


def render_scaled_object(metadata: dict[str, Any], autoscaling: Autoscaling) -> dict[str, Any]:
    name, namespace = metadata["name"], metadata["namespace"]
    threshold = target_quantity(autoscaling)
    if threshold.endswith("m"):  # KEDA's thresholds are plain numbers
        threshold = str(int(threshold[:-1]) / 1000)
    return {
        "apiVersion": KEDA_API[0],
        "kind": KEDA_API[1],
        "metadata": metadata,
        "spec": {
            "scaleTargetRef": {"apiVersion": API_VERSION, "kind": "LLMDeployment", "name": name},
            "minReplicaCount": autoscaling.min_replicas,
            "maxReplicaCount": autoscaling.max_replicas,
            # From the last replica to zero waits as long as scaling down does.
            "cooldownPeriod": autoscaling.scale_down_stabilization_seconds,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _scale_down(autoscaling)}},
            "triggers": [
                {
                    "type": "prometheus",
                    "metadata": {
                        "serverAddress": PROMETHEUS_URL,
                        "query": prometheus_query(
                            AUTOSCALING_METRICS[autoscaling.metric], namespace, name
                        ),
                        "threshold": threshold,
                    },
                }
            ],
        },
    }


def render_autoscaler(
    metadata: dict[str, Any], autoscaling: Autoscaling | None
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """(the autoscaler to apply, if any; the (apiVersion, kind) of the autoscalers to delete)."""
    if autoscaling is None:
        return [], [HPA_API, KEDA_API]
    if autoscaling.provider == "KEDA":
        # KEDA makes an HPA of its own (keda-hpa-<name>): ours must go, or two would fight.
        return [render_scaled_object(metadata, autoscaling)], [HPA_API]
    return [render_hpa(metadata, autoscaling)], [KEDA_API]
