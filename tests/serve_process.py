"""A real `kvops serve` process for tests: free loopback ports, readiness wait, log on failure."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """`kvops serve` (or another serving `command`, such as ("index", "serve")) in a subprocess;
    `with ServeProcess(...) as server:` waits until ready."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        startup_timeout: float = 180,
        command: tuple[str, ...] = ("serve",),
    ):
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.args = [
            sys.executable,
            "-m",
            "kvops.worker.serve.cli",
            *command,
            "--http-port",
            str(self.http_port),
            "--grpc-port",
            str(self.grpc_port),
            *args,
        ]
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout = startup_timeout
        self.log = tempfile.NamedTemporaryFile(prefix="kvops-serve-", suffix=".log")  # noqa: SIM115
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> ServeProcess:
        self.process = subprocess.Popen(
            self.args, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"kvops serve exited with {code}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"kvops serve not ready in {self.startup_timeout}s:\n{self.tail()}")

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def tail(self, lines: int = 40) -> str:
        with open(self.log.name, errors="replace") as file:
            return "".join(file.readlines()[-lines:])

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        self.log.close()


def index_serve_process(index: str | os.PathLike) -> ServeProcess:
    """`kvops index serve` over the built index folder `index`, on 127.0.0.1."""
    return ServeProcess("--index", str(index), "--host", "127.0.0.1", command=("index", "serve"))


def metrics(server) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, keyed by (sample name, sorted labels)."""
    text = httpx.get(f"{server.base_url}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric_sum(samples: dict, name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and labels.items() <= dict(sample_labels).items()
    )


def wait_until_idle(server, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        samples = metrics(server)
        idle = (
            metric_sum(samples, "kvops_num_requests_running") == 0
            and metric_sum(samples, "kvops_kv_cache_usage_ratio") == 0
        )
        if idle or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def engine_answer(engine, messages, max_tokens: int, ignore_eos: bool = False) -> str:
    """What the engine itself answers, greedily, for these chat messages."""
    from kvops.worker.request import SamplingParams

    tokenizer = engine.tokenizer
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos)
    [output] = engine.generate(prompt_token_ids=[ids], sampling_params=params)
    return output.text
