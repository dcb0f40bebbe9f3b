"""The CustomResourceDefinitions, generated from the models in kvops.operator.api.

Pydantic's JSON Schema is not a Kubernetes structural schema, so `structural()` inlines
references and rewrites what the API server refuses. `kvops crds` / `make crds` write the result
to crds/ (a test fails on drift).
"""

from __future__ import annotations

import copy
from typing import Any

from kvops.operator.api import GROUP, RESOURCES, VERSION, Resource

# Keywords of JSON Schema that a CRD's schema (OpenAPI v3.0, structural) refuses or ignores.
_DROPPED_KEYWORDS = {"title", "$defs", "additionalProperties", "const", "anyOf", "allOf"}


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """Pydantic's JSON Schema of a model as a Kubernetes structural schema."""
    definitions = schema.get("$defs", {})

    def convert(node: dict[str, Any]) -> dict[str, Any]:
        node = dict(node)
        if "$ref" in node:  # inline the definition; keywords beside the $ref win
            target = definitions[node.pop("$ref").rsplit("/", 1)[-1]]
            node = {**target, **node}
        if "allOf" in node and len(node["allOf"]) == 1:
            node = {**node["allOf"][0], **{k: v for k, v in node.items() if k != "allOf"}}
            return convert(node)
        nullable = False
        if "anyOf" in node:
            branches = [b for b in node["anyOf"] if b.get("type") != "null"]
            nullable = len(branches) < len(node["anyOf"])
            types = {b.get("type") for b in branches}
            if types == {"integer", "string"}:
                # int | str: one field that takes either, as resource.Quantity and IntOrString do
                node["x-kubernetes-int-or-string"] = True
            elif len(branches) == 1:
                node = {**convert(branches[0]), **{k: v for k, v in node.items() if k != "anyOf"}}
            else:
                raise ValueError(f"no structural form for anyOf {node['anyOf']}")
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DROPPED_KEYWORDS or (key == "default" and value is None):
                continue
            if key == "properties":
                value = {name: convert(child) for name, child in value.items()}
            elif key == "items":
                value = convert(value)
            elif key == "exclusiveMinimum" or key == "exclusiveMaximum":
                # JSON Schema's number form -> OpenAPI v3.0's boolean form
                out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
                value = True
            out[key] = value
        if "const" in node:
            out["enum"] = [node["const"]]
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = convert(extra)
        elif extra is True:
            out["x-kubernetes-preserve-unknown-fields"] = True
        # `additionalProperties: false` needs nothing: a structural schema already prunes unknown
        # fields and `kubectl apply` (field validation Strict) rejects them.
        if nullable:
            out["nullable"] = True
        if "default" in out and isinstance(out["default"], dict | list) and not out["default"]:
            del out["default"]
        return out

    return convert({k: v for k, v in schema.items() if k != "$defs"})


def openapi_schema(resource: Resource) -> dict[str, Any]:
    spec = structural(resource.spec.model_json_schema(by_alias=True))
    status = structural(resource.status.model_json_schema(by_alias=True))
    spec.pop("description", None)
    status.pop("description", None)
    rule = resource.name_rule()
    return {
        "type": "object",
        "required": ["spec"],
        **({"x-kubernetes-validations": [rule]} if rule else {}),
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def crd(resource: Resource) -> dict[str, Any]:
    subresources: dict[str, Any] = {"status": {}}
    if resource.scale:
        subresources["scale"] = {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": resource.name},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": resource.kind,
                "listKind": f"{resource.kind}List",
                "plural": resource.plural,
                "singular": resource.kind.lower(),
                "shortNames": [resource.short_name],
                "categories": ["kvops"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema(resource)},
                    "subresources": subresources,
                    "additionalPrinterColumns": copy.deepcopy(resource.columns),
                }
            ],
        },
    }


def peering_crd(kind: str, scope: str) -> dict[str, Any]:
    """kopf's peering resource: running operators record themselves in it and the ones of lower
    priority pause, so that one replica of the operator works at a time."""
    plural = f"{kind.lower()}s"
    free_form = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    schema = {"type": "object", "properties": {"status": free_form}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev"},
        "spec": {
            "group": "kopf.dev",
            "scope": scope,
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def crd_documents() -> dict[str, str]:
    """File name -> YAML text of every CRD, as committed under crds/."""
    import yaml

    header = "# Generated from operator/api.py by `kvops crds --output-dir crds`; do not edit.\n"
    crds = {f"{GROUP}_{resource.plural}.yaml": crd(resource) for resource in RESOURCES}
    for kind, scope in [("KopfPeering", "Namespaced"), ("ClusterKopfPeering", "Cluster")]:
        crds[f"kopf.dev_{kind.lower()}s.yaml"] = peering_crd(kind, scope)
    return {
        name: header + yaml.safe_dump(obj, sort_keys=False, width=100) for name, obj in crds.items()
    }
