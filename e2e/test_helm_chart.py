"""The Helm chart (charts/kvops) in real clusters.

- Every object `helm template` renders, for the default values and for ci/all-on-values.yaml,
  validates with kubeconform against JSON schemas made from the local kube-apiserver's own OpenAPI
  v3 (built-in kinds, our CRDs and the Prometheus Operator's, as that API server serves them):
  no schema is downloaded, and the schemas refuse unknown fields as the API server would prune them.
- `helm install` on the fake GPU nodes: the CRDs and the operator's permissions come from the
  chart, the operator (the working tree, as in test_operator_cluster.py) runs under the chart's
  ServiceAccount and brings the example LLMDeployment to Available; `helm uninstall` removes
  everything but the CRDs. The chart's own operator pod "runs" on a kwok node, where no container
  ever starts: the Deployment is Available and the working-tree process does the work.
- On the real node with the project's images: `helm install` gives a Running operator pod that
  reconciles, and `helm test` passes.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_helpers import Namespace, install_crds, wait_for
from test_operator_cluster import Operator

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "kvops"
BIN = ROOT / ".tools" / "bin"
ALL_ON = CHART / "ci" / "all-on-values.yaml"
# The Prometheus Operator's CRDs from its Go module (the module proxy's zip holds the repository's
# example/ folder); only the three kinds the chart renders are installed.
PROMETHEUS_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
MONITORING_KINDS = ("servicemonitors", "podmonitors", "prometheusrules")
OPERATOR_IMAGE = "ghcr.io/kvops/kvops-operator:0.1.0"
# Without the chart's prometheus-adapter: on kwok its pod never runs, so its APIService would leave
# custom.metrics.k8s.io unavailable to the session's other tests, and the real node has no
# registry to pull its image from (e2e/test_autoscaling_real_node.py runs the adapter).
NO_ADAPTER = ("--set", "autoscaling.mode=none")


def helm(cluster, *args: str, timeout: float = 240) -> str:
    command = [str(BIN / "helm"), "--kubeconfig", str(cluster.kubeconfig), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)}: {result.stdout}{result.stderr}")
    return result.stdout


def monitoring_crds() -> list[Path]:
    result = subprocess.run(
        ["go", "mod", "download", "-json", PROMETHEUS_OPERATOR],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        cwd="/",
    )
    folder = Path(json.loads(result.stdout)["Dir"]) / "example" / "prometheus-operator-crd"
    return [folder / f"monitoring.coreos.com_{kind}.yaml" for kind in MONITORING_KINDS]


@pytest.fixture(scope="module")
def monitoring_api(kube_cluster) -> Iterator[None]:
    """The monitoring.coreos.com/v1 kinds the chart renders, served by the fake-node cluster while
    this module runs (the other tests run without them)."""
    for path in monitoring_crds():
        kube_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    names = [f"crd/{kind}.monitoring.coreos.com" for kind in MONITORING_KINDS]
    kube_cluster.kubectl("wait", "--for", "condition=Established", "--timeout=60s", *names)
    yield
    # Not waited for: the API server's cleanup of a CRD can take minutes.
    kube_cluster.kubectl("delete", "--wait=false", *names)


# -- schemas from the API server's OpenAPI v3, in kubeconform's file layout ---------------------


def json_schema(node: Any) -> Any:
    """One OpenAPI v3 schema node as JSON Schema: `nullable` allows null, references point into
    the file's own `definitions`, and an object that lists its properties refuses others (unless
    it preserves unknown fields), as kubeconform's `-strict` schemas do."""
    if isinstance(node, list):
        return [json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "$ref":
            out[key] = value.replace("#/components/schemas/", "#/definitions/")
        elif key == "properties":
            out[key] = {name: json_schema(child) for name, child in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[key] = json_schema(value)
        else:
            out[key] = value
    if out.pop("nullable", False) is True:
        out = {"anyOf": [out, {"type": "null"}]}
    elif (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):  # (JSONSchemaProps has a "$ref" field)
                yield value.rsplit("/", 1)[-1]
            else:
                yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)


def write_schemas(cluster, group_versions: set[str], folder: Path) -> list[str]:
    """`<kind>-<group's first label>-<version>.json` (kubeconform's `{{ .ResourceKind }}{{
    .KindSuffix }}`) for every kind of `group_versions`, each with the closure of the definitions
    it references. Returns the files written."""
    index = json.loads(cluster.kubectl("get", "--raw", "/openapi/v3"))["paths"]
    written = []
    for group_version in sorted(group_versions):
        group, _, version = group_version.rpartition("/")
        path = f"apis/{group_version}" if group else f"api/{version}"
        assert path in index, f"the API server does not serve {group_version}"
        document = json.loads(
            cluster.kubectl("get", "--raw", index[path]["serverRelativeURL"], timeout=120)
        )
        schemas = document["components"]["schemas"]
        for schema in schemas.values():
            kinds = [
                gvk["kind"]
                for gvk in schema.get("x-kubernetes-group-version-kind", [])
                if (gvk["group"], gvk["version"]) == (group, version)
            ]
            for kind in kinds:
                needed: dict[str, Any] = {}
                pending = list(references(schema))
                while pending:
                    name = pending.pop()
                    if name not in needed:
                        needed[name] = schemas[name]
                        pending.extend(references(schemas[name]))
                suffix = f"-{group.split('.')[0]}-{version}" if group else f"-{version}"
                file = folder / f"{kind.lower()}{suffix}.json"
                converted = json_schema(schema)
                converted["definitions"] = {name: json_schema(s) for name, s in needed.items()}
                file.write_text(json.dumps(converted))
                written.append(file.name)
    return written


def kubeconform(schemas: Path, manifests: Path) -> list[dict[str, Any]]:
    """kubeconform's verdict on every resource of `manifests` (a missing schema is an error)."""
    location = f"{schemas}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json"
    command = [str(BIN / "kubeconform"), "-strict", "-verbose", "-output", "json"]
    command += ["-schema-location", location, str(manifests)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return json.loads(result.stdout)["resources"]


def helm_template(*args: str) -> str:
    command = [str(BIN / "helm"), "template", "kvops", str(CHART), "-n", "kvops-system", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


@pytest.mark.usefixtures("monitoring_api")
def test_every_rendered_object_validates_against_the_api_servers_schemas(kube_cluster, tmp_path):
    install_crds(kube_cluster)
    renders = {
        "default": helm_template(),
        "all-on": helm_template("-f", str(ALL_ON), "--api-versions", "monitoring.coreos.com/v1"),
    }
    objects = [doc for text in renders.values() for doc in yaml.safe_load_all(text) if doc]
    group_versions = {obj["apiVersion"] for obj in objects}
    assert "monitoring.coreos.com/v1" in group_versions
    schemas = tmp_path / "schemas"
    schemas.mkdir()
    paths = {f"apis/{gv}" if "/" in gv else f"api/{gv}" for gv in group_versions}
    # The API server publishes a new CRD's OpenAPI a moment after it is Established.
    wait_for(
        "the OpenAPI of every group-version rendered",
        lambda: (
            paths <= set(json.loads(kube_cluster.kubectl("get", "--raw", "/openapi/v3"))["paths"])
        ),
        timeout=30,
    )
    written = write_schemas(kube_cluster, group_versions, schemas)
    assert {"deployment-apps-v1.json", "podmonitor-monitoring-v1.json"} <= set(written)
    for name, text in renders.items():
        manifests = tmp_path / f"{name}.yaml"
        manifests.write_text(text)
        results = kubeconform(schemas, manifests)
        bad = [r for r in results if r["status"] != "statusValid"]
        assert not bad, json.dumps(bad, indent=1)
        count = sum(1 for doc in yaml.safe_load_all(text) if doc)
        assert len(results) == count, f"{name}: {len(results)} validated of {count}"
    # The schemas are strict and typed: a misspelt field and a wrong type fail.
    deployment = next(
        obj
        for obj in objects
        if (obj["kind"], obj["metadata"]["name"]) == ("Deployment", "kvops-operator")
    )
    deployment["spec"]["replica"] = 1
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "x"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(deployment))
    [verdict] = kubeconform(schemas, broken)
    assert verdict["status"] == "statusInvalid"
    assert "at '/spec': additional properties 'replica' not allowed" in verdict["msg"]
    assert "ports/0/containerPort': got string, want integer" in verdict["msg"]


# -- helm install with the fake GPU nodes ---------------------------------------------------------


def operator_kubeconfig(cluster, namespace: str, account: str, folder: Path) -> Path:
    """A kubeconfig that acts as the chart's ServiceAccount: only the chart's roles apply."""
    token = cluster.kubectl("create", "token", account, "-n", namespace, "--duration", "1h")
    config = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    config["users"] = [{"name": "operator", "user": {"token": token.strip()}}]
    for context in config["contexts"]:
        context["context"]["user"] = "operator"
    path = folder / "operator.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def release_objects(kube: Namespace) -> list[str]:
    """Every object but the CRDs that the chart installed in this namespace (and the cluster-wide
    ones named after it)."""
    selector = "app.kubernetes.io/managed-by=Helm,app.kubernetes.io/part-of=kvops"
    kinds = "deployments,services,serviceaccounts,roles,rolebindings,configmaps,"
    kinds += "servicemonitors,podmonitors,prometheusrules"
    namespaced = kube("get", kinds, "-l", selector, "-o", "name").split()
    cluster_wide = kube.cluster.kubectl(
        "get", "clusterroles,clusterrolebindings", "-l", selector, "-o", "name"
    ).split()
    return namespaced + [name for name in cluster_wide if kube.namespace in name]


@pytest.mark.usefixtures("monitoring_api")
def test_helm_install_runs_the_example_and_uninstall_keeps_only_the_crds(kube_cluster, tmp_path):
    namespace = f"kvops-helm-{uuid.uuid4().hex[:6]}"
    kube_cluster.kubectl("create", "namespace", namespace)
    kube = Namespace(kube_cluster, namespace)
    # --take-ownership: other tests of this session may have applied the CRDs with kubectl.
    notes = helm(
        kube_cluster, "install", "kvops", str(CHART), "-n", namespace, *NO_ADAPTER,
        "--take-ownership", "--wait", "--timeout", "120s",
    )  # fmt: skip
    assert "rollout status deployment/kvops-operator" in notes, notes
    assert "Prometheus Operator found: ServiceMonitor (operator) PodMonitor" in notes, notes
    for crd in ("llmdeployments.kvops.io", "kopfpeerings.kopf.dev"):
        annotations = json.loads(kube_cluster.kubectl("get", "crd", crd, "-o", "json"))
        annotations = annotations["metadata"]["annotations"]
        assert annotations["helm.sh/resource-policy"] == "keep"
        assert annotations["meta.helm.sh/release-namespace"] == namespace
    installed = release_objects(kube)
    for expected in (
        "deployment.apps/kvops-operator",
        "service/kvops-operator-metrics",
        "serviceaccount/kvops-operator",
        "role.rbac.authorization.k8s.io/kvops-operator",
        "podmonitor.monitoring.coreos.com/kvops-workers",
        "prometheusrule.monitoring.coreos.com/kvops",
        f"clusterrole.rbac.authorization.k8s.io/kvops-operator-discovery-{namespace}",
    ):
        assert expected in installed, installed
    assert any(name.startswith("configmap/kvops-dashboard-") for name in installed)

    config = operator_kubeconfig(kube_cluster, namespace, "kvops-operator", tmp_path)
    operator = Operator(config, namespace, tmp_path / "operator.log")
    operator.start()
    try:
        kube("apply", "-f", str(ROOT / "examples" / "llmdeployment.yaml"))
        kube.wait(
            "the example Available",
            lambda: kube.status("llmd", "smollm2").get("phase") == "Available",
        )
        kube("delete", "llmd", "smollm2", "--timeout=60s")
    except BaseException:
        print(operator.log_tail(60))
        raise
    finally:
        operator.stop()
    log = operator.log.read_text(errors="replace")
    assert "Forbidden" not in log and "with an exception" not in log, operator.log_tail(60)

    helm(kube_cluster, "uninstall", "kvops", "-n", namespace, "--wait", "--timeout", "120s")
    assert release_objects(kube) == []
    for crd in ("llmdeployments.kvops.io", "promptversions.kvops.io", "vectorindexes.kvops.io"):
        kube_cluster.kubectl("get", "crd", crd)  # still there
    kube_cluster.kubectl("delete", "namespace", namespace, "--wait=false")


# -- helm install on the real node ---------------------------------------------------------------


def test_helm_install_on_the_real_node_runs_the_operator_and_helm_test_passes(cluster):
    namespace = "kvops-helm-real"
    labels = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn")}
    manifest = {"apiVersion": "v1", "kind": "Namespace"}
    manifest["metadata"] = {"name": namespace, "labels": labels}
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    kube = Namespace(cluster, namespace)
    assert OPERATOR_IMAGE in cluster.images()
    helm(
        cluster, "install", "kvops", str(CHART), "-n", namespace, *NO_ADAPTER,
        "--take-ownership", "--wait", "--timeout", "180s",
    )  # fmt: skip
    try:
        [pod] = kube.items("pods", "app.kubernetes.io/name=kvops-operator")
        assert pod["status"]["phase"] == "Running"
        assert pod["spec"]["nodeName"] == "kvops-node-0"  # the real node: kwok's are tainted
        assert pod["spec"]["containers"][0]["image"] == OPERATOR_IMAGE
        llmd = yaml.safe_load((ROOT / "examples" / "llmdeployment.yaml").read_text())
        kube.apply(llmd)
        deployment = kube.wait(
            "the operator pod to render the example's Deployment",
            lambda: kube.get("deployment", "smollm2"),
        )
        assert deployment["metadata"]["ownerReferences"][0]["kind"] == "LLMDeployment"
        out = helm(cluster, "test", "kvops", "-n", namespace, "--logs", "--timeout", "120s")
        assert re.search(r"Phase:\s+Succeeded", out), out
        assert "the operator answers at" in out, out
        kube("delete", "llmd", "smollm2", "--timeout=60s")
    finally:
        helm(cluster, "uninstall", "kvops", "-n", namespace, "--wait", "--timeout", "120s")
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")
