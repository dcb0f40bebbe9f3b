"""The chart's autoscaling metrics path (charts/kvops/templates/autoscaling/): prometheus-adapter
with kvops' rules behind the custom.metrics.k8s.io APIService, or KEDA only where it is served.
Rendering needs .tools/bin/helm (`make tools`); e2e/test_autoscaling_real_node.py runs the same
rules against a real Prometheus and HPA controller."""

from __future__ import annotations

import pytest
import yaml
from test_chart import CHART, NAMESPACE, by_kind, helm

pytestmark = pytest.mark.slow  # needs helm from `make tools`

RULES = CHART / "files" / "autoscaling" / "prometheus-adapter.yaml"
ADAPTER_KINDS = {"APIService", "ConfigMap", "Deployment", "Service", "ServiceAccount"}


def render(*args: str) -> list[dict]:
    """Every object `helm template` renders (test_chart.render leaves out this folder's)."""
    result = helm("template", "kvops", str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def adapter_objects(objects: list[dict]) -> list[dict]:
    return [
        obj
        for obj in objects
        if "prometheus-adapter" in obj["metadata"]["name"]
        or obj["metadata"]["name"] == "v1beta1.custom.metrics.k8s.io"
    ]


def test_the_adapter_serves_the_charts_rules_behind_the_apiservice():
    objects = adapter_objects(render())
    assert {obj["kind"] for obj in objects} >= ADAPTER_KINDS
    [config] = by_kind(objects, "ConfigMap")
    rules = yaml.safe_load(config["data"]["config.yaml"])["rules"]
    assert rules == yaml.safe_load(RULES.read_text())["rules"]
    [deployment] = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert "--prometheus-url=http://prometheus-operated.monitoring.svc:9090" in container["args"]
    assert "--config=/etc/adapter/config.yaml" in container["args"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    [service] = by_kind(objects, "Service")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [api_service] = by_kind(objects, "APIService")
    assert api_service["spec"]["group"] == "custom.metrics.k8s.io"
    assert api_service["spec"]["service"] == {
        "name": service["metadata"]["name"],
        "namespace": NAMESPACE,
        "port": service["spec"]["ports"][0]["port"],
    }
    # The adapter may check callers through the apiserver and read the front proxy's CA.
    bindings = by_kind(adapter_objects(render()), "ClusterRoleBinding")
    assert "system:auth-delegator" in {b["roleRef"]["name"] for b in bindings}


@pytest.mark.parametrize("mode", ["none", "keda"])
def test_other_modes_install_no_adapter(mode):
    objects = render("--set", f"autoscaling.mode={mode}", "--api-versions", "keda.sh/v1alpha1")
    assert not adapter_objects(objects)


def test_keda_mode_refuses_a_cluster_without_keda():
    result = helm("template", "kvops", str(CHART), "--set", "autoscaling.mode=keda")
    assert result.returncode != 0
    assert "serves no keda.sh/v1alpha1" in result.stderr
