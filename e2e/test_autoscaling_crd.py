"""The CRD's autoscaling rules in a real kube-apiserver (CEL): the target's form must match its
metric, and minReplicas 0 needs KEDA. The same cases as the operator's own parse
(tests/test_autoscaling.py), sent as server-side dry runs. Then the operator, under its own Role,
in a cluster without KEDA: provider KEDA says so, provider HPA gets its HPA."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import yaml
from kube_helpers import Namespace, install_crds
from test_autoscaling import ACCEPTED, REFUSED
from test_operator_cluster import operator_under_its_role


@pytest.fixture(scope="module")
def crd_namespace(kube_cluster) -> Namespace:
    install_crds(kube_cluster)
    name = f"kvops-scaling-{uuid.uuid4().hex[:6]}"
    kube_cluster.kubectl("create", "namespace", name)
    return Namespace(kube_cluster, name)


def scaled(name: str, scaling: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kvops.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"source": "builtin://smollm2"}, "gpus": 0, "autoscaling": scaling},
    }


def dry_run(namespace: Namespace, scaling: dict[str, Any]) -> str:
    obj = scaled("scaled", scaling)
    return namespace("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(obj))


@pytest.mark.parametrize(("scaling", "message"), REFUSED)
def test_the_api_server_refuses_a_target_of_the_wrong_form(crd_namespace, scaling, message):
    with pytest.raises(Exception, match="spec.autoscaling") as refusal:
        dry_run(crd_namespace, scaling)
    assert message in str(refusal.value)


@pytest.mark.parametrize("scaling", ACCEPTED)
def test_the_api_server_accepts_matching_targets(crd_namespace, scaling):
    assert "created (server dry run)" in dry_run(crd_namespace, scaling)


def test_without_keda_provider_keda_is_degraded_and_provider_hpa_scales(
    kube_cluster, crd_namespace, tmp_path
):
    with operator_under_its_role(kube_cluster, crd_namespace.namespace, tmp_path):
        to_zero = {"minReplicas": 0, "maxReplicas": 2, "provider": "KEDA"}
        crd_namespace.apply(scaled("keda", to_zero))
        crd_namespace.apply(scaled("hpa", {"maxReplicas": 2, "target": 2}))

        def keda_missing():
            condition = crd_namespace.condition("llmd", "keda", "Degraded")
            return condition if condition and condition["status"] == "True" else None

        degraded = crd_namespace.wait("llmd/keda Degraded", keda_missing, 60)
        assert degraded["reason"] == "KedaNotInstalled"
        assert "install KEDA" in degraded["message"]
        # Nothing of the KEDA deployment was applied; the HPA one got its HPA (and deleting the
        # stale ScaledObject of a kind the cluster lacks did not fail its reconcile).
        assert crd_namespace.get("deployment", "keda") is None
        hpa = crd_namespace.wait("the HPA", lambda: crd_namespace.get("hpa", "hpa"), 60)
        target = hpa["spec"]["metrics"][0]["pods"]["target"]
        assert target == {"type": "AverageValue", "averageValue": "2"}
