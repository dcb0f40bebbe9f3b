"""The operator's own Prometheus metrics (prefix kvops_operator_)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Histogram

RECONCILES = Counter(
    "kvops_operator_reconciles_total", "Reconciliations by kind and result", ["kind", "result"]
)
ERRORS = Counter("kvops_operator_errors_total", "Reconciliations that raised", ["kind"])
DURATION = Histogram(
    "kvops_operator_reconcile_duration_seconds",
    "Time to reconcile one object",
    ["kind"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


@contextmanager
def measured(kind: str) -> Iterator[None]:
    """Count and time one reconciliation; an exception counts as an error and propagates."""
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        RECONCILES.labels(kind, "error").inc()
        ERRORS.labels(kind).inc()
        raise
    else:
        RECONCILES.labels(kind, "success").inc()
    finally:
        DURATION.labels(kind).observe(time.perf_counter() - start)
