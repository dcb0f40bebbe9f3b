"""The Helm chart (charts/kvops) against the operator's own definitions: its CRDs are crds/, its
roles are operator/rbac.py's rules, its operator Deployment is `kvops manifests`' one, its
PodMonitor selects the worker pods the operator renders. Rendering needs .tools/bin/helm (`make
tools`); the schema validation of every rendered object against the API server's OpenAPI is in
e2e/test_helm_chart.py."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvops.operator import llmdeployment, rbac
from kvops.operator.api import OPERATOR_IMAGE, LLMDeploymentSpec

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "kvops"
HELM = ROOT / ".tools" / "bin" / "helm"
ALL_ON = CHART / "ci" / "all-on-values.yaml"
MONITORING = ("--api-versions", "monitoring.coreos.com/v1")
NAMESPACE = "kvops-system"

slow = pytest.mark.slow  # needs helm from `make tools`


def helm(*args: str) -> subprocess.CompletedProcess:
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: run `make tools`")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)


def render(*args: str) -> list[dict[str, Any]]:
    """The objects `helm template` renders, but those of templates/autoscaling/ (the metrics
    adapter: tests/test_autoscaling*.py)."""
    result = helm("template", "kvops", str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, result.stderr
    objects = []
    for document in result.stdout.split("\n---\n"):
        source = re.search(r"^# Source: (\S+)", document, flags=re.MULTILINE)
        obj = yaml.safe_load(document)
        if obj and not (source and source.group(1).startswith("kvops/templates/autoscaling/")):
            objects.append(obj)
    return objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def test_the_charts_crds_are_the_generated_ones():
    """`make crds` writes both folders; an edit of api.py without it fails here."""
    ours = {path.name: path.read_bytes() for path in (ROOT / "crds").glob("*.yaml")}
    charts = {path.name: path.read_bytes() for path in (CHART / "files" / "crds").glob("*.yaml")}
    assert charts == ours, "charts/kvops/files/crds differs from crds/: run `make crds`"


@slow
@pytest.mark.parametrize("values", [(), ("-f", str(ALL_ON))], ids=["default", "all-on"])
def test_helm_lint_passes(values):
    result = helm("lint", "--strict", str(CHART), *values)
    assert result.returncode == 0, result.stdout + result.stderr


@slow
def test_crds_render_as_generated_and_are_kept_on_uninstall():
    crds = by_kind(render(), "CustomResourceDefinition")
    files = sorted((ROOT / "crds").glob("*.yaml"))
    assert len(crds) == len(files)
    rendered = {crd["metadata"]["name"]: crd for crd in crds}
    for path in files:
        generated = yaml.safe_load(path.read_text())
        crd = rendered[generated["metadata"]["name"]]
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert crd["spec"] == generated["spec"], path.name
        assert {k: v for k, v in crd.items() if k != "metadata"} == {
            k: v for k, v in generated.items() if k != "metadata"
        }
    assert not by_kind(render("--set", "crds.install=false"), "CustomResourceDefinition")


@slow
@pytest.mark.parametrize("clusterwide", [False, True])
def test_roles_are_the_operators_own_rules(clusterwide):
    objects = render("--set", f"operator.watchAllNamespaces={str(clusterwide).lower()}")
    [account] = by_kind(objects, "ServiceAccount")
    [deployment] = by_kind(objects, "Deployment")
    assert (
        deployment["spec"]["template"]["spec"]["serviceAccountName"]
        == (account["metadata"]["name"])
    )
    subject = {"kind": "ServiceAccount", "name": account["metadata"]["name"]}
    subject["namespace"] = NAMESPACE
    [cluster_role] = by_kind(objects, "ClusterRole")
    if clusterwide:
        assert not by_kind(objects, "Role")
        assert cluster_role["rules"] == rbac.DISCOVERY + rbac.rules(True)
    else:
        [role] = by_kind(objects, "Role")
        assert role["metadata"]["namespace"] == NAMESPACE
        assert role["rules"] == rbac.rules(False)
        assert cluster_role["rules"] == rbac.DISCOVERY
    roles = by_kind(objects, "Role") + [cluster_role]
    bindings = by_kind(objects, "RoleBinding") + by_kind(objects, "ClusterRoleBinding")
    assert {(b["roleRef"]["kind"], b["roleRef"]["name"]) for b in bindings} == {
        (r["kind"], r["metadata"]["name"]) for r in roles
    }
    assert all(binding["subjects"] == [subject] for binding in bindings)


@slow
@pytest.mark.parametrize("clusterwide", [False, True])
def test_the_operator_deployment_is_the_one_kvops_manifests_renders(clusterwide):
    objects = render("--set", f"operator.watchAllNamespaces={str(clusterwide).lower()}")
    [deployment] = by_kind(objects, "Deployment")
    expected = rbac.operator_deployment(NAMESPACE, clusterwide, OPERATOR_IMAGE)
    pod, want_pod = deployment["spec"]["template"]["spec"], expected["spec"]["template"]["spec"]
    [container], [want] = pod["containers"], want_pod["containers"]
    assert container == want  # image, command, probes, ports, resources, security context
    assert pod["securityContext"] == want_pod["securityContext"]
    assert pod["volumes"] == want_pod["volumes"]
    assert deployment["spec"]["strategy"] == expected["spec"]["strategy"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert expected["spec"]["selector"]["matchLabels"].items() <= selector.items()


@slow
def test_operator_values_reach_the_pod():
    objects = render("-f", str(ALL_ON), *MONITORING)
    values = yaml.safe_load(ALL_ON.read_text())["operator"]
    [deployment] = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "imagePullSecrets"):
        assert pod[key] == values[key], key
    [container] = pod["containers"]
    assert container["resources"] == values["resources"]
    assert container["command"][-1] == "--all-namespaces"
    assert (
        values["podLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert pod["serviceAccountName"] == "kvops-controller"


@slow
def test_monitoring_objects_only_where_the_api_exists():
    kinds = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert not kinds & {obj["kind"] for obj in render()}
    objects = render(*MONITORING)
    assert kinds <= {obj["kind"] for obj in objects}
    disabled = [f"metrics.{key}.enabled=false" for key in ("serviceMonitor", "podMonitor")]
    disabled.append("metrics.prometheusRule.enabled=false")
    off = render(*MONITORING, "--set", ",".join(disabled))
    assert not kinds & {obj["kind"] for obj in off}


@slow
def test_the_service_monitor_scrapes_the_operators_metrics_port():
    objects = render(*MONITORING)
    [monitor] = by_kind(objects, "ServiceMonitor")
    [service] = by_kind(objects, "Service")
    [deployment] = by_kind(objects, "Deployment")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    [endpoint] = monitor["spec"]["endpoints"]
    [port] = service["spec"]["ports"]
    assert endpoint["port"] == port["name"]
    assert endpoint["honorLabels"] is True  # kvops_operator_resources{namespace} stays as is
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port["targetPort"] == "metrics" and ports["metrics"] == rbac.METRICS_PORT
    assert service["spec"]["selector"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )


@slow
def test_the_pod_monitor_selects_the_worker_pods_the_operator_renders():
    [monitor] = by_kind(render(*MONITORING, "-f", str(ALL_ON)), "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = {"model": {"source": "builtin://smollm2"}, "gpus": 0}
    body = {
        "apiVersion": "kvops.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": "chat", "namespace": "team", "uid": "u", "generation": 1},
        "spec": spec,
    }
    worker = llmdeployment.render_deployment(body, LLMDeploymentSpec.model_validate(spec))
    template = worker["spec"]["template"]
    labels = template["metadata"]["labels"]
    selector = monitor["spec"]["selector"]
    assert selector["matchLabels"].items() <= labels.items()
    for expression in selector["matchExpressions"]:
        assert expression["operator"] == "Exists" and expression["key"] in labels
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    [container] = template["spec"]["containers"]
    assert endpoint["port"] in {port["name"] for port in container["ports"]}
    assert endpoint["path"] == template["metadata"]["annotations"]["prometheus.io/path"]
    [relabel] = endpoint["relabelings"]
    label = relabel["sourceLabels"][0].removeprefix("__meta_kubernetes_pod_label_")
    assert label == "kvops_io_llmdeployment" and relabel["targetLabel"] == "llmdeployment"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}  # all-on watches everywhere
    [one] = by_kind(render(*MONITORING), "PodMonitor")
    assert one["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


@slow
def test_the_prometheus_rule_is_the_alerts_file():
    [rule] = by_kind(render(*MONITORING), "PrometheusRule")
    alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    assert rule["spec"] == alerts
    assert all(
        r.get("annotations", {}).get("runbook") for g in alerts["groups"] for r in g["rules"]
    )


@slow
def test_one_dashboard_config_map_per_json_file_for_the_grafana_sidecar():
    files = sorted((CHART / "files" / "dashboards").glob("*.json"))
    assert files
    maps = by_kind(render("-f", str(ALL_ON)), "ConfigMap")
    assert len(maps) == len(files)
    for config_map, path in zip(sorted(maps, key=lambda m: [*m["data"]]), files, strict=True):
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["namespace"] == "monitoring"
        assert config_map["metadata"]["annotations"] == {"grafana_folder": "LLM serving"}
        assert json.loads(config_map["data"][path.name]) == json.loads(path.read_text())
    assert not by_kind(render("--set", "dashboards.enabled=false"), "ConfigMap")


@slow
def test_the_helm_test_pod_checks_the_operators_metrics_service_under_restricted_security():
    objects = render()
    [pod] = by_kind(objects, "Pod")
    [service] = by_kind(objects, "Service")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    [container] = pod["spec"]["containers"]
    assert container["image"] == OPERATOR_IMAGE
    script = container["command"][-1]
    assert f"http://{service['metadata']['name']}.{NAMESPACE}.svc:9090/metrics" in script
    restricted = rbac.operator_deployment(NAMESPACE, False, OPERATOR_IMAGE)["spec"]["template"]
    assert pod["spec"]["securityContext"] == restricted["spec"]["securityContext"]
    assert container["securityContext"] == restricted["spec"]["containers"][0]["securityContext"]


@slow
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("operator.replicas=2", "at '/operator/replicas': maximum: got 2, want 1"),
        ("operator.imag.tag=x", "at '/operator': additional properties 'imag' not allowed"),
        ("operator.image.pullPolicy=Sometimes", "at '/operator/image/pullPolicy'"),
        ("metrics.podMonitor.interval=fast", "at '/metrics/podMonitor/interval'"),
        ("dashboards.namespace=Not_A_Name", "at '/dashboards/namespace'"),
    ],
)
def test_values_schema_refuses_bad_values_naming_the_key(setting, message):
    result = helm("template", "kvops", str(CHART), "--set", setting)
    assert result.returncode != 0
    assert message in result.stderr


def test_every_documented_value_is_in_the_schema():
    """values.yaml and values.schema.json describe the same keys (additionalProperties: false
    refuses undocumented ones; this catches a documented key the schema forgot)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        if isinstance(value, dict) and "properties" in node:
            for key, child in value.items():
                assert key in node["properties"], f"{path}.{key} is not in values.schema.json"
                walk(child, node["properties"][key], f"{path}.{key}")

    walk(values, schema, "")
