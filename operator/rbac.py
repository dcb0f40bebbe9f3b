"""The operator's install manifests: its permissions, least privilege (exactly what its handlers
and kopf use; the cluster tests run the operator under these rules, so a missing verb fails there
first), and the Deployment that runs it from the operator image."""

from __future__ import annotations

from typing import Any

from kvops.operator.api import GROUP, OPERATOR_IMAGE, RESOURCES
from kvops.operator.autoscaling import DEFAULT_PROMETHEUS_URL
from kvops.operator.kube import FIELD_MANAGER
from kvops.operator.pods import restricted_container_security, restricted_pod_security

NAME = FIELD_MANAGER
# Server-side apply creates a missing object and patches an existing one.
APPLY = ["get", "list", "watch", "create", "patch"]


def rules(clusterwide: bool) -> list[dict[str, Any]]:
    plurals = [resource.plural for resource in RESOURCES]
    peering = "clusterkopfpeerings" if clusterwide else "kopfpeerings"
    return [
        # kopf patches annotations (its progress); the operator never writes a spec.
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
        # A VectorIndex drops the claims of builds it no longer serves.
        {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": [*APPLY, "delete"]},
        # Pod status and Warning events are how a worker's failure reaches the owner's status.
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        # The progress line of a running `model-pull` init container (status.modelCache).
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": APPLY},
        {
            "apiGroups": ["autoscaling"],
            "resources": ["horizontalpodautoscalers"],
            "verbs": [*APPLY, "delete"],
        },
        # autoscaling.provider KEDA: a ScaledObject instead of the HPA (where KEDA is installed).
        {"apiGroups": ["keda.sh"], "resources": ["scaledobjects"], "verbs": [*APPLY, "delete"]},
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": [*APPLY, "delete"]},
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
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


LIVENESS_PORT = 8080
METRICS_PORT = 9090


def operator_deployment(namespace: str, clusterwide: bool, image: str) -> dict[str, Any]:
    """One operator pod under the ServiceAccount above; restricted Pod Security (non-root, read-only
    root filesystem, no capabilities), so it runs in a namespace that enforces it."""
    labels = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/component": "operator"}
    scope = ["--all-namespaces"] if clusterwide else ["--namespace", namespace]
    probe = {
        "httpGet": {"path": "/healthz", "port": "liveness"},
        "periodSeconds": 10,
        "timeoutSeconds": 5,
        "failureThreshold": 6,
    }
    container = {
        "name": "operator",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["kvops", "operator", *scope],
        "args": [
            "--liveness",
            f"http://0.0.0.0:{LIVENESS_PORT}/healthz",
            "--metrics-port",
            str(METRICS_PORT),
        ],
        "ports": [
            {"name": "liveness", "containerPort": LIVENESS_PORT},
            {"name": "metrics", "containerPort": METRICS_PORT},
        ],
        "env": [{"name": "KVOPS_PROMETHEUS_URL", "value": DEFAULT_PROMETHEUS_URL}],
        "livenessProbe": probe,
        "resources": {
            "requests": {"cpu": "100m", "memory": "256Mi"},
            "limits": {"memory": "512Mi"},
        },
        "securityContext": restricted_container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": NAME, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": 1,
            # Two operators at once would both reconcile: the old one goes first.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS_PORT),
                    },
                },
                "spec": {
                    "serviceAccountName": NAME,
                    "securityContext": restricted_pod_security(),
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }


def install_documents(
    namespace: str, clusterwide: bool, image: str = OPERATOR_IMAGE
) -> list[dict[str, Any]]:
    """Everything `kvops manifests` prints: permissions and the operator Deployment (the CRDs
    come from `kvops crds`)."""
    return [*documents(namespace, clusterwide), operator_deployment(namespace, clusterwide, image)]
