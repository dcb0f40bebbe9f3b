"""A real Prometheus (Debian's `prometheus` package) for tests: 127.0.0.1 only, its own temporary
data folder, a 1 s scrape interval, stopped (killed at the latest) when the test is done."""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from serve_process import free_port

# Debian's prometheus package (make host-deps).
PROMETHEUS = shutil.which("prometheus")


@dataclass(frozen=True)
class ScrapeTarget:
    address: str  # host:port serving /metrics
    labels: dict[str, str]  # target labels, as a PodMonitor's relabelling adds them
    # The series' own labels win over the target's (the operator's `namespace` is a resource's).
    honor_labels: bool = False


class PrometheusProcess:
    """`with PrometheusProcess({"worker": ScrapeTarget("127.0.0.1:8000", {...})}) as prom:`
    scrapes each job's target every second."""

    def __init__(self, targets: dict[str, ScrapeTarget]):
        if PROMETHEUS is None:
            raise RuntimeError("no prometheus binary: install Debian's prometheus (make host-deps)")
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="kvops-prometheus-"))
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {
                    "job_name": job,
                    "honor_labels": target.honor_labels,
                    "static_configs": [{"targets": [target.address], "labels": target.labels}],
                }
                for job, target in targets.items()
            ],
        }
        (self.folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (self.folder / "prometheus.log").open("w")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> PrometheusProcess:
        assert PROMETHEUS is not None
        self.process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self.folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"prometheus not ready in {timeout}s:\n{self.tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def tail(self, lines: int = 30) -> str:
        self.log.flush()
        return "".join((self.folder / "prometheus.log").read_text().splitlines(True)[-lines:])

    def __enter__(self) -> PrometheusProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector `expr` gives now; a query Prometheus refuses raises with its error."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body = response.json()
        if body.get("status") != "success":
            raise ValueError(f"{expr}: {body.get('errorType')}: {body.get('error')}")
        assert body["data"]["resultType"] == "vector", expr
        return body["data"]["result"]

    def wait_for(self, expr: str, timeout: float = 30) -> list[dict[str, Any]]:
        """Wait until `expr` has a finite value (a scrape or two after the event)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if any(math.isfinite(float(series["value"][1])) for series in result):
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"no data for {expr} in {timeout}s:\n{self.tail()}")
            time.sleep(0.5)


def finite_values(result: list[dict[str, Any]]) -> list[float]:
    return [v for v in (float(s["value"][1]) for s in result) if math.isfinite(v)]
