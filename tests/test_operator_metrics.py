"""The operator's gauges of its resources' statuses (kvops_operator_resources, worker replicas,
evaluation pass rates): what the dashboards' operator panels and the WorkersNotReady alert read."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvops.operator.metrics import ResourceStatusCollector


def obj(kind: str, name: str, namespace: str = "shop", **extra) -> dict:
    return {"kind": kind, "metadata": {"name": name, "namespace": namespace}, **extra}


def samples(collector: ResourceStatusCollector) -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_resources_are_counted_by_kind_namespace_and_phase():
    collector = ResourceStatusCollector()
    collector.observe(obj("LLMDeployment", "a"), {"phase": "Available", "replicas": 2,
                                                  "readyReplicas": 1})  # fmt: skip
    collector.observe(obj("LLMDeployment", "b"), {"phase": "Available", "replicas": 1,
                                                  "readyReplicas": 1})  # fmt: skip
    collector.observe(obj("VectorIndex", "i", "other"), {"phase": "Building"})
    collector.observe(obj("PromptVersion", "p"), {"valid": False})
    got = samples(collector)
    resources = "kvops_operator_resources"
    key = (("kind", "LLMDeployment"), ("namespace", "shop"), ("phase", "Available"))
    assert got[(resources, key)] == 2
    key = (("kind", "VectorIndex"), ("namespace", "other"), ("phase", "Building"))
    assert got[(resources, key)] == 1
    key = (("kind", "PromptVersion"), ("namespace", "shop"), ("phase", "Invalid"))
    assert got[(resources, key)] == 1
    a = (("llmdeployment", "a"), ("namespace", "shop"))
    assert got[("kvops_operator_llmdeployment_replicas", a)] == 2
    assert got[("kvops_operator_llmdeployment_ready_replicas", a)] == 1

    # A phase change moves the object; a deleted one is no longer counted.
    collector.observe(obj("LLMDeployment", "b"), {"phase": "Degraded", "readyReplicas": 0})
    collector.forget(obj("LLMDeployment", "a"))
    got = samples(collector)
    key = (("kind", "LLMDeployment"), ("namespace", "shop"), ("phase", "Degraded"))
    assert got[(resources, key)] == 1
    key = (("kind", "LLMDeployment"), ("namespace", "shop"), ("phase", "Available"))
    assert (resources, key) not in got
    assert ("kvops_operator_llmdeployment_replicas", a) not in got


def test_evaluation_pass_rate_by_prompt_version_survives_partial_patches_and_deletion():
    collector = ResourceStatusCollector()
    spec = {"promptName": "faq", "version": "v2"}
    evaluated = {"valid": True, "lastEvaluation": {"passRate": 0.75, "passed": 3, "failed": 1}}
    version = obj("PromptVersion", "faq-v2", spec=spec)
    collector.observe(version, evaluated)
    # A labels-only patch, as publish_labels writes, of an object whose status has the result
    # (e.g. after an operator restart).
    collector.forget(version)
    collector.observe({**version, "status": evaluated}, {"heldLabels": ["production"]})
    labels = (("namespace", "shop"), ("prompt_name", "faq"), ("prompt_version", "v2"))
    ratio = ("kvops_operator_prompt_evaluation_pass_ratio", labels)
    assert samples(collector)[ratio] == 0.75
    collector.forget(version)
    assert ratio not in samples(collector)
