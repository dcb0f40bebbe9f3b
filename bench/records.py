"""Where benchmark scripts put their figures: one JSON file per run in bench/results/, naming the
script, command, date and machine."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    """CPU, CPU count, memory and OS, e.g. ``x86_64, 2 CPUs, 24 GiB, Linux``."""
    with open("/proc/meminfo") as meminfo:
        memory_gib = round(int(meminfo.readline().split()[1]) / 2**20)
    cpus = len(os.sched_getaffinity(0))
    return (
        f"{platform.processor() or platform.machine()}, {cpus} CPUs, {memory_gib} GiB, "
        f"{platform.system()}"
    )


def write_record(benchmark: str, rows: list[dict], **details: str) -> Path:
    """Write ``bench/results/<benchmark>-<UTC date-time>.json`` and return its path."""
    stamp = datetime.now(UTC)
    record = {
        "benchmark": benchmark,
        "date": stamp.isoformat(timespec="seconds"),
        "machine": machine(),
        "command": " ".join(["python", f"bench/{benchmark}.py", *sys.argv[1:]]),
        **details,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{benchmark}-{stamp:%Y%m%d-%H%M}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return path
