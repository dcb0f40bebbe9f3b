"""The resource models and the CRDs generated from them (no cluster needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kvops.operator import api, crd

ROOT = Path(__file__).resolve().parent.parent
SPECS = {r.kind: r.spec for r in api.RESOURCES}
STATUSES = {r.kind: r.status for r in api.RESOURCES}


def walk(schema: dict[str, Any], path: str = ""):
    """Every (path, node) of a schema."""
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def test_committed_crds_match_the_generator():
    for name, text in crd.crd_documents().items():
        committed = ROOT / "crds" / name
        assert committed.exists(), f"crds/{name} is missing: run `make crds`"
        assert committed.read_text() == text, f"crds/{name} is stale: run `make crds`"


@pytest.mark.parametrize("resource", api.RESOURCES, ids=lambda r: r.kind)
def test_schemas_are_structural(resource):
    schema = crd.crd(resource)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    refused = {"$ref", "$defs", "anyOf", "allOf", "oneOf", "title", "const"}
    for path, node in walk(schema):
        assert not refused & node.keys(), f"{path}: {refused & node.keys()}"
        assert "default" not in node or node["default"] is not None, path
        assert node.get("additionalProperties") is not False, path
        # Structural: every node says its type, unless it is int-or-string or free-form.
        assert (
            "type" in node
            or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")
        ), path
        if isinstance(node.get("exclusiveMinimum"), int | float):
            pytest.fail(f"{path}: exclusiveMinimum must be a boolean in OpenAPI v3.0")


def test_schema_details_kubernetes_relies_on():
    llmd = crd.crd(api.RESOURCE_BY_KIND["LLMDeployment"])
    version = llmd["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["model"]
    assert spec["properties"]["replicas"]["minimum"] == 0
    assert spec["properties"]["model"]["properties"]["source"]["pattern"].startswith("^(hf://")
    autoscaling = spec["properties"]["autoscaling"]
    assert autoscaling["nullable"] is True
    assert autoscaling["properties"]["target"]["x-kubernetes-int-or-string"] is True
    assert "minReplicas <= self.maxReplicas" in autoscaling["x-kubernetes-validations"][0]["rule"]
    assert spec["properties"]["nodeSelector"]["additionalProperties"]["type"] == "string"
    assert spec["properties"]["env"]["x-kubernetes-list-map-keys"] == ["name"]  # unique names
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert llmd["spec"]["names"]["shortNames"] == ["llmd"]
    assert llmd["spec"]["names"]["categories"] == ["kvops"]

    pver = crd.crd(api.RESOURCE_BY_KIND["PromptVersion"])
    template = pver["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["template"]
    assert template["x-kubernetes-validations"][0]["rule"] == "self == oldSelf"
    vidx = crd.crd(api.RESOURCE_BY_KIND["VectorIndex"])
    chunking = vidx["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["chunking"]
    assert chunking["x-kubernetes-validations"][0]["rule"] == "self.overlap < self.size"


def jsonpath(obj: dict[str, Any], path: str) -> Any:
    """The value at a dotted printer-column path such as .status.readyReplicas."""
    for key in path.lstrip(".").split("."):
        obj = obj[key]
    return obj


@pytest.mark.parametrize("resource", api.RESOURCES, ids=lambda r: r.kind)
def test_printer_columns_resolve_on_the_sample(resource):
    sample = yaml.safe_load(
        (ROOT / "crds" / "samples" / f"{resource.kind.lower()}.yaml").read_text()
    )
    resource.spec.model_validate(sample["spec"])
    resource.status.model_validate(sample["status"])
    types = {"string": str, "integer": int, "boolean": bool, "date": str}
    for column in resource.columns:
        value = jsonpath(sample, column["jsonPath"])
        if isinstance(value, list):  # kubectl prints a list of strings as one cell
            value = ",".join(value)
        assert isinstance(value, types[column["type"]]), column
        if column["type"] == "string":
            assert value, column


@pytest.mark.parametrize("kind", ["LLMDeployment", "PromptVersion", "VectorIndex"])
def test_examples_parse(kind):
    example = yaml.safe_load((ROOT / "examples" / f"{kind.lower()}.yaml").read_text())
    assert example["kind"] == kind
    assert example["apiVersion"] == api.API_VERSION
    SPECS[kind].model_validate(example["spec"])


@pytest.mark.parametrize(
    "source",
    [
        "hf://HuggingFaceTB/SmolLM2-135M-Instruct@main",
        "hf://org/name",
        "pvc://models/llama/8b",
        "s3://my-bucket/models/llama",
        "builtin://smollm2",
    ],
)
def test_model_sources_accepted(source):
    api.ModelSource(source=source)


@pytest.mark.parametrize(
    "source",
    [
        "http://example.com/x",
        "hf://onlyname",
        "pvc://Bad_Claim/x",
        "builtin://llama",
        "s3://b",
        "hf://org/name@",
    ],
)
def test_model_sources_refused(source):
    with pytest.raises(ValidationError, match="source"):
        api.ModelSource(source=source)


def test_cross_field_rules_mirror_the_cel_rules():
    with pytest.raises(ValidationError, match="minReplicas must not exceed maxReplicas"):
        api.Autoscaling(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError, match="overlap must be smaller"):
        api.Chunking(size=64, overlap=64)
    with pytest.raises(ValidationError, match="exactly one of value and secretKeyRef"):
        api.EnvVar(name="HF_TOKEN")
    with pytest.raises(ValidationError, match="exactly one of configMap, pvc and documents"):
        api.IndexSource()
    with pytest.raises(ValidationError, match="without a key must use operator Exists"):
        api.Toleration(key="", operator="Equal")
    with pytest.raises(ValidationError, match="operator Exists takes no value"):
        api.Toleration(key="a", operator="Exists", value="b")
    assert api.Toleration(operator="Exists").key is None  # tolerates every taint
    with pytest.raises(ValidationError, match="duplicate names"):
        api.LLMDeploymentSpec.model_validate(
            {"model": {"source": "builtin://smollm2"}, "env": [{"name": "A", "value": "1"}] * 2}
        )
    with pytest.raises(ValidationError, match="is not a label key"):
        api.LLMDeploymentSpec.model_validate(
            {"model": {"source": "builtin://smollm2"}, "nodeSelector": {"bad key": "x"}}
        )
    with pytest.raises(ValidationError, match="unknownField"):
        api.LLMDeploymentSpec.model_validate(
            {"model": {"source": "builtin://smollm2"}, "unknownField": 1}
        )


def test_crds_command_prints_every_crd():
    out = subprocess.run(
        [sys.executable, "-m", "kvops.worker.serve.cli", "crds"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    kinds = [d["spec"]["names"]["kind"] for d in yaml.safe_load_all(out)]
    assert kinds == [
        "LLMDeployment",
        "PromptVersion",
        "VectorIndex",
        "KopfPeering",
        "ClusterKopfPeering",
    ]


def imported_after(statement: str, module: str) -> bool:
    code = f"import sys\n{statement}\nprint({module!r} in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return json.loads(out.strip().lower())


def test_operator_never_imports_torch():
    assert imported_after("import kvops.operator.main", "torch") is False


def test_the_worker_cli_does_not_pay_for_kopf():
    # Building the whole parser (the operator's subcommands included) imports no kopf.
    statement = (
        "import contextlib, io\nfrom kvops.worker.serve.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])"
    )
    assert imported_after(statement, "kopf") is False
