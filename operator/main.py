"""The operator process: kopf settings, the three resources' handlers, metrics and liveness."""

from __future__ import annotations

import logging
from typing import Any

import kopf

# Importing the modules registers their handlers with kopf.
from kvops.operator import llmdeployment, promptversion, vectorindex  # noqa: F401
from kvops.operator.kube import FIELD_MANAGER

PEERING_NAME = FIELD_MANAGER


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # kopf's own bookkeeping goes into annotations: the CRDs' status schemas have no room for it
    # (a structural schema would prune status.kopf).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kvops.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kvops.io", key="last-handled-configuration"
    )
    # Leader election through kopf's peering: where a KopfPeering (or ClusterKopfPeering) named
    # kvops-operator exists, an operator pauses while one of higher priority runs. Without one
    # the operator runs alone.
    settings.peering.name = PEERING_NAME
    settings.peering.mandatory = False
    # kopf's own warnings and errors become Events; our transitions are posted explicitly.
    settings.posting.enabled = True
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.batching.error_delays = [1, 2, 5, 10, 30]
    settings.execution.max_workers = 8


def run(
    namespaces: list[str],
    liveness: str | None,
    metrics_port: int | None,
    priority: int,
    endpoint_template: str,
) -> None:
    import prometheus_client

    prometheus_client.disable_created_metrics()
    if metrics_port:
        prometheus_client.start_http_server(metrics_port)
    kopf.configure(verbose=False)
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=liveness,
        peering_name=PEERING_NAME,
        priority=priority,
        memo=kopf.Memo(endpoint_template=endpoint_template),
    )
