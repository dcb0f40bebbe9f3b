"""Draw a dashboard as a PNG from Prometheus range queries, laid out as Grafana lays it out.

No Grafana server could be built here (docs/architecture.md says why), so the pictures in
docs/dashboards/ are drawn from the same queries the panels run, against a real Prometheus:

    python -m kvops.observability.render_png --prometheus http://127.0.0.1:9090 \\
        --minutes 5 --out docs/dashboards --var namespace=shop --var deployment=chat ...

tests/test_observability_live.py and e2e/test_observability_operator.py call `render` on the
Prometheus they fill (KVOPS_DASHBOARD_PNG_DIR=docs/dashboards keeps their pictures).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from kvops.observability.dashboards import (
    COLUMNS,
    Dashboard,
    dashboards,
    substitute,
)

# A range query: substituted expression -> Prometheus' matrix result.
RangeQuery = Callable[[str], list[dict[str, Any]]]

UNIT_LABELS = {"s": "seconds", "percentunit": "ratio", "reqps": "requests/s", "short": ""}


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip()


def render(
    dashboard: Dashboard,
    query_range: RangeQuery,
    variables: dict[str, str],
    path: Path,
    time_range: tuple[float, float],
) -> dict[str, int]:
    """Draw every panel over `time_range` (epoch seconds, the range `query_range` asks for)
    into `path`; returns panel title -> number of series drawn."""
    import matplotlib

    matplotlib.use("Agg")  # no display; chosen before pyplot is imported
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    rows = -(-len(dashboard.panels) // COLUMNS)
    figure, axes = plt.subplots(rows, COLUMNS, figsize=(8 * COLUMNS, 3.2 * rows), squeeze=False)
    figure.patch.set_facecolor("#181b1f")
    drawn = {}
    for index, axis in enumerate(axes.flat):
        if index >= len(dashboard.panels):
            axis.set_visible(False)
            continue
        panel = dashboard.panels[index]
        axis.set_facecolor("#111217")
        axis.tick_params(colors="#ccccdc", labelsize=8)
        for spine in axis.spines.values():
            spine.set_color("#2f3037")
        axis.grid(color="#2f3037", linewidth=0.5)
        axis.set_title(panel.title, color="#ccccdc", loc="left", fontsize=11)
        axis.set_ylabel(UNIT_LABELS.get(panel.unit, panel.unit), color="#8e8e99", fontsize=8)
        count = 0
        for query in panel.queries:
            for series in query_range(substitute(query.expr, variables)):
                points = [(float(t), float(v)) for t, v in series["values"]]
                times = [datetime.fromtimestamp(t) for t, _ in points]
                axis.plot(
                    times,
                    [v for _, v in points],
                    linewidth=1.5,
                    label=legend(query.legend, series["metric"]),
                )
                count += 1
        if count:
            axis.legend(fontsize=7, facecolor="#181b1f", labelcolor="#ccccdc", loc="upper left")
        else:
            axis.text(0.5, 0.5, "No data", color="#8e8e99", ha="center", transform=axis.transAxes)
        axis.set_xlim(*(datetime.fromtimestamp(t) for t in time_range))
        axis.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        drawn[panel.title] = count
    figure.suptitle(dashboard.title, color="#ccccdc", fontsize=14, x=0.01, ha="left")
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80, facecolor=figure.get_facecolor())
    plt.close(figure)
    return drawn


def prometheus_range(url: str, start: float, end: float, step: float) -> RangeQuery:
    def query(expr: str) -> list[dict[str, Any]]:
        response = httpx.get(
            f"{url}/api/v1/query_range",
            params={"query": expr, "start": start, "end": end, "step": step},
            timeout=30,
        )
        body = response.json()
        if body.get("status") != "success":
            raise ValueError(f"{expr}: {body.get('error')}")
        return body["data"]["result"]

    return query


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", required=True, help="base URL of a Prometheus")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    parser.add_argument("--minutes", type=float, default=15, help="time range up to now")
    parser.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a template variable's value (a regex; default .*)",
    )
    args = parser.parse_args(argv)
    variables = {"namespace": ".*", "deployment": ".*", "model": ".*", "prompt": ".*"}
    for item in args.var:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--var takes NAME=VALUE, got {item!r}")
        variables[name] = value
    end = time.time()
    start = end - args.minutes * 60
    step = max(1.0, (end - start) / 300)
    variables["__rate_interval"] = f"{max(4 * int(step), 15)}s"
    fetch = prometheus_range(args.prometheus, start, end, step)
    for name, dashboard in dashboards().items():
        path = args.out / name.replace(".json", ".png")
        render(dashboard, fetch, variables, path, (start, end))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
