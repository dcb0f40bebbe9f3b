"""The operator's permissions, least privilege: exactly what its handlers and kopf use. The
cluster tests run the operator under these rules, so a missing verb fails there first."""

from __future__ import annotations

from typing import Any

from kvops.operator.api import GROUP, RESOURCES
from kvops.operator.kube import FIELD_MANAGER

NAME = FIELD_MANAGER
# Server-side apply creates a missing object and patches an existing one.
APPLY = ["get", "list", "watch", "create", "patch"]


def rules(clusterwide: bool) -> list[dict[str, Any]]:
    plurals = [resource.plural for resource in RESOURCES]
    peering = "clusterkopfpeerings" if clusterwide else "kopfpeerings"
    return [
        # kopf patches annotations (its progress) and the operator moves PromptVersion labels.
        {"apiGroups": [GROUP], "resources": plurals, "verbs": ["get", "list", "watch", "patch"]},
        {
            "apiGroups": [GROUP],
            "resources": [f"{plural}/status" for plural in plurals],
            "verbs": ["get", "patch"],
        },
        {
            "apiGroups": ["kopf.dev"],
            "resources": [peering],
            "verbs": ["get", "list", "watch", "patch"],
        },
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": APPLY},
        {"apiGroups": [""], "resources": ["services"], "verbs": APPLY},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": [*APPLY, "delete"]},
        {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": APPLY},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": APPLY},
        {
            "apiGroups": ["autoscaling"],
            "resources": ["horizontalpodautoscalers"],
            "verbs": [*APPLY, "delete"],
        },
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": [*APPLY, "delete"]},
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
    ]


# kopf discovers resources through CRDs and namespaces; without read access it retries for a
# minute before it falls back. Read-only and cluster-wide, because both kinds are cluster-scoped.
DISCOVERY = [
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["list", "watch"],
    },
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
]


def _role(kind: str, name: str, namespace: str | None, rules_: list[dict]) -> list[dict[str, Any]]:
    """A Role or ClusterRole and its binding to the operator's ServiceAccount."""
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None and kind == "Role":
        metadata["namespace"] = namespace
    group = "rbac.authorization.k8s.io"
    return [
        {"apiVersion": f"{group}/v1", "kind": kind, "metadata": metadata, "rules": rules_},
        {
            "apiVersion": f"{group}/v1",
            "kind": f"{kind}Binding",
            "metadata": dict(metadata),
            "roleRef": {"apiGroup": group, "kind": kind, "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": namespace}],
        },
    ]


def documents(namespace: str, clusterwide: bool) -> list[dict[str, Any]]:
    """ServiceAccount, roles and bindings for an operator living in `namespace`."""
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": NAME, "namespace": namespace},
    }
    if clusterwide:
        return [account, *_role("ClusterRole", NAME, namespace, DISCOVERY + rules(True))]
    return [
        account,
        *_role("ClusterRole", f"{NAME}-discovery-{namespace}", namespace, DISCOVERY),
        *_role("Role", NAME, namespace, rules(False)),
    ]
