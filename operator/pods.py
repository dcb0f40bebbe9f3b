"""Pod building blocks every kind renders: the worker's ports, probes and the security contexts of
Pod Security `restricted` (non-root, read-only root filesystem, no capabilities)."""

from __future__ import annotations

from typing import Any

# The worker's and the index server's ports (kvops serve --http-port / --grpc-port).
HTTP_PORT = 8000
GRPC_PORT = 50051
# The image's user (worker/Dockerfile, operator/Dockerfile).
RUN_AS_USER = 10001


def restricted_container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def restricted_pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def http_probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 5,
    }
