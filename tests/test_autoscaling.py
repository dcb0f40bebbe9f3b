"""The autoscaler an LLMDeployment renders (HPA or KEDA ScaledObject), the rules its spec obeys
(the pydantic mirrors of the CRD's CEL rules; e2e/test_autoscaling_crd.py sends the same cases to
a real apiserver), and the chart's prometheus-adapter rules that serve the HPA's metrics."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvops.operator import api, autoscaling, llmdeployment
from kvops.operator.api import LLMDeploymentSpec

ROOT = Path(__file__).resolve().parent.parent
ADAPTER_RULES = ROOT / "charts" / "kvops" / "files" / "autoscaling" / "prometheus-adapter.yaml"

# (autoscaling spec, a piece of the message both the CRD and the operator's parse give)
REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"maxReplicas": 2, "metric": "kvCacheUsage", "target": 8}, "for metric kvCacheUsage"),
    ({"maxReplicas": 2, "metric": "kvCacheUsage", "target": "150%"}, "for metric kvCacheUsage"),
    ({"maxReplicas": 2, "metric": "kvCacheUsage", "target": "1.5"}, "for metric kvCacheUsage"),
    ({"maxReplicas": 2, "metric": "queueDepth", "target": "80%"}, "for metric queueDepth"),
    ({"maxReplicas": 2, "metric": "queueDepth", "target": 0}, "for metric queueDepth"),
    ({"maxReplicas": 2, "metric": "queueDepth", "target": "0.5"}, "for metric queueDepth"),
    ({"minReplicas": 0, "maxReplicas": 2}, "needs provider KEDA"),
    ({"minReplicas": 3, "maxReplicas": 2}, "must not exceed maxReplicas"),
]
ACCEPTED: list[dict[str, Any]] = [
    {"maxReplicas": 2},
    {"maxReplicas": 2, "metric": "queueDepth", "target": 4},
    {"maxReplicas": 2, "metric": "queueDepth", "target": "4"},
    {"maxReplicas": 2, "metric": "kvCacheUsage"},
    {"maxReplicas": 2, "metric": "kvCacheUsage", "target": "80%"},
    {"maxReplicas": 2, "metric": "kvCacheUsage", "target": "0.75"},
    {"minReplicas": 0, "maxReplicas": 2, "provider": "KEDA"},
]


def spec_with(scaling: dict[str, Any]) -> dict[str, Any]:
    return {"model": {"source": "builtin://smollm2"}, "autoscaling": scaling}


def children(scaling: dict[str, Any] | None) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    owner = {"metadata": {"name": "chat", "namespace": "team", "uid": "uid-1"}}
    spec = {"model": {"source": "builtin://smollm2"}}
    if scaling is not None:
        spec["autoscaling"] = scaling
    apply, stale = llmdeployment.render(
        {**owner, "apiVersion": api.API_VERSION, "kind": "LLMDeployment"},
        LLMDeploymentSpec.model_validate(spec),
        [],
    )
    return {child["kind"]: child for child in apply}, stale


@pytest.mark.parametrize(("scaling", "message"), REFUSED)
def test_the_operator_refuses_what_the_crd_refuses(scaling, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LLMDeploymentSpec.model_validate(spec_with(scaling))


@pytest.mark.parametrize("scaling", ACCEPTED)
def test_matching_targets_are_accepted(scaling):
    LLMDeploymentSpec.model_validate(spec_with(scaling))


@pytest.mark.parametrize(
    ("scaling", "metric", "average"),
    [
        ({"maxReplicas": 3}, "kvops_num_requests_waiting", "8"),
        ({"maxReplicas": 3, "target": 2}, "kvops_num_requests_waiting", "2"),
        ({"maxReplicas": 3, "metric": "kvCacheUsage"}, "kvops_kv_cache_usage_ratio", "800m"),
        (
            {"maxReplicas": 3, "metric": "kvCacheUsage", "target": "0.65"},
            "kvops_kv_cache_usage_ratio",
            "650m",
        ),
    ],
)
def test_the_hpa_target_is_a_count_or_a_fraction(scaling, metric, average):
    rendered, stale = children(scaling)
    hpa = rendered["HorizontalPodAutoscaler"]
    [pods_metric] = hpa["spec"]["metrics"]
    assert pods_metric["pods"]["metric"]["name"] == metric
    assert pods_metric["pods"]["target"] == {"type": "AverageValue", "averageValue": average}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert "ScaledObject" not in rendered
    assert ("keda.sh/v1alpha1", "ScaledObject", "chat") in stale


def test_keda_renders_a_scaled_object_in_place_of_the_hpa():
    scaling = {
        "minReplicas": 0,
        "maxReplicas": 4,
        "provider": "KEDA",
        "metric": "kvCacheUsage",
        "target": "75%",
        "scaleDownStabilizationSeconds": 60,
    }
    rendered, stale = children(scaling)
    assert "HorizontalPodAutoscaler" not in rendered
    assert ("autoscaling/v2", "HorizontalPodAutoscaler", "chat") in stale
    scaled = rendered["ScaledObject"]
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "kvops.io/v1alpha1",
        "kind": "LLMDeployment",
        "name": "chat",
    }
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (0, 4)
    assert scaled["spec"]["cooldownPeriod"] == 60
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["serverAddress"] == autoscaling.PROMETHEUS_URL
    assert trigger["metadata"]["threshold"] == "0.75"
    query = trigger["metadata"]["query"]
    assert query.startswith("sum(kvops_kv_cache_usage_ratio{") and 'namespace="team"' in query
    # The pod pattern is the Deployment's pods only, not those of another deployment "chat-x".
    pods = re.search(r'pod=~"([^"]+)"', query).group(1)
    assert re.fullmatch(pods, "chat-7d9f8c6b5-x2x4z")
    assert not re.fullmatch(pods, "chat-x-7d9f8c6b5-x2x4z")


def test_without_autoscaling_both_kinds_of_autoscaler_go():
    rendered, stale = children(None)
    assert not {"HorizontalPodAutoscaler", "ScaledObject"} & set(rendered)
    assert ("autoscaling/v2", "HorizontalPodAutoscaler", "chat") in stale
    assert ("keda.sh/v1alpha1", "ScaledObject", "chat") in stale


def test_the_adapter_rules_serve_every_metric_under_the_name_the_hpa_asks_for():
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    [rule] = rules
    names = re.search(r'__name__=~"([^"]+)"', rule["seriesQuery"]).group(1).split("|")
    assert sorted(names) == sorted(autoscaling.AUTOSCALING_METRICS.values())
    # Served under the series' own name, per pod and namespace.
    assert (rule["name"]["matches"], rule["name"]["as"]) == ("^(.*)$", "${1}")
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
