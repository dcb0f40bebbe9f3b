"""A real S3 server for tests: MinIO, built from the Go module proxy on first use and cached by
version (KVOPS_TOOLS_CACHE, default ~/.cache/kvops/tools/minio-<version>), as
e2e/tools/build_tools.py caches the Kubernetes tools. MinIO publishes RELEASE.* tags, which are
not semantic versions, so the module proxy knows it by a pseudo-version of a commit."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

MINIO_MODULE = "github.com/minio/minio"
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"
BUILD_TIMEOUT = 15 * 60
ACCESS_KEY = "kvops-test"
SECRET_KEY = "kvops-test-secret"


def tools_cache() -> Path:
    return Path(os.environ.get("KVOPS_TOOLS_CACHE", Path.home() / ".cache" / "kvops" / "tools"))


def minio_binary() -> Path:
    """The cached MinIO binary, built first if missing (a few minutes; needs `go`)."""
    cached = tools_cache() / f"minio-{MINIO_VERSION}"
    if cached.is_file():
        return cached
    go = shutil.which("go")
    if go is None:
        raise FileNotFoundError(f"MinIO is not cached at {cached} and there is no `go` to build it")
    with tempfile.TemporaryDirectory(prefix="kvops-minio-") as gobin:
        subprocess.run(
            [go, "install", "-ldflags", "-s -w", f"{MINIO_MODULE}@{MINIO_VERSION}"],
            env={**os.environ, "GOBIN": gobin, "CGO_ENABLED": "0"},
            check=True,
            timeout=BUILD_TIMEOUT,
        )
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(os.path.join(gobin, "minio"), cached)
    return cached


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MinioServer:
    """`with MinioServer(data_dir) as s3:`; s3.env holds the AWS variables that reach it."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL_S3": self.url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }
        self.process: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="kvops-minio-", suffix=".log")  # noqa: SIM115

    def __enter__(self) -> MinioServer:
        address = f"127.0.0.1:{self.port}"
        console = f"127.0.0.1:{_free_port()}"
        self.process = subprocess.Popen(
            [
                str(minio_binary()),
                "server",
                str(self.data_dir),
                "--address",
                address,
                "--console-address",
                console,
                "--quiet",
            ],
            env={
                **os.environ,
                "MINIO_ROOT_USER": ACCESS_KEY,
                "MINIO_ROOT_PASSWORD": SECRET_KEY,
                "MINIO_BROWSER": "off",
            },
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"minio exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/minio/health/live", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise TimeoutError(f"minio not ready: {Path(self.log.name).read_text()[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )
