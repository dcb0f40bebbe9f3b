"""The progress line of a pull: bytes, rate and ETA, logged at a steady interval."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """Counts the bytes fetched (from any thread) and logs a line every `interval` seconds."""

    def __init__(self, label: str, total: int, interval: float, out: TextIO | None = None):
        self.label = label
        self.total = total  # bytes of the files not yet in the cache
        self.interval = interval
        self.out = out or sys.stderr
        self.done = 0
        self.resumed = 0  # bytes found on disk from an interrupted pull: done, but not in the rate
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="pull-progress", daemon=True)

    def __enter__(self) -> Progress:
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n

    def add_resumed(self, n: int) -> None:
        with self._lock:
            self.done += n
            self.resumed += n

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-6)
        rate = (self.done - self.resumed) / elapsed
        percent = 100.0 * self.done / self.total if self.total else 100.0
        left = self.total - self.done
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        return (
            f"kvops: pull {self.label}: {human_bytes(self.done)} of {human_bytes(self.total)} "
            f"({percent:.0f}%), {human_bytes(rate)}/s, ETA {eta}"
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            print(self.line(), file=self.out, flush=True)
