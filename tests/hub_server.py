"""A small Hugging Face Hub for tests: enough of the Hub's file API for huggingface_hub.

    GET  /api/models/<org>/<name>[/revision/<rev>]   model info: the commit hash and the files
                                                     (?blobs=true: sizes, blob ids, LFS sha256)
    GET  /<org>/<name>/resolve/<rev>/<file>          the file, with Range, ETag, X-Repo-Commit
    HEAD /<org>/<name>/resolve/<rev>/<file>

Errors carry the Hub's X-Error-Code headers (RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo), so huggingface_hub raises its own exceptions. Faults for the tests: `drop_at` closes
the connection mid-file, `corrupt` flips a byte in a file's next responses. Every file request is
logged with the bytes it was sent.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


@dataclass
class HubFile:
    path: Path
    size: int
    sha256: str  # LFS oid
    git_sha1: str  # blob id

    @property
    def is_lfs(self) -> bool:
        return self.path.name.endswith(LFS_SUFFIXES)

    @property
    def etag(self) -> str:
        return self.sha256 if self.is_lfs else self.git_sha1


@dataclass
class HubRepo:
    files: dict[str, HubFile]
    commit: str
    branches: dict[str, str]
    token: str | None = None  # set: a gated repo that needs this token


@dataclass
class Served:
    method: str
    repo: str
    file: str
    range: str | None
    bytes: int


@dataclass
class HubState:
    repos: dict[str, HubRepo] = field(default_factory=dict)
    log: list[Served] = field(default_factory=list)
    # file -> (offset, times): a response that starts before the offset and reaches past it
    # stops there and the connection closes, `times` times (None: always)
    drop_at: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    corrupt: dict[str, int] = field(default_factory=dict)  # file -> responses left to corrupt
    lock: threading.Lock = field(default_factory=threading.Lock)


def describe(path: Path) -> HubFile:
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            sha256.update(block)
            sha1.update(block)
    return HubFile(path, path.stat().st_size, sha256.hexdigest(), sha1.hexdigest())


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState  # set on the subclass HubServer makes

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._route(send_body=True)

    def do_HEAD(self) -> None:
        self._route(send_body=False)

    def _route(self, send_body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        api = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/(.+))?$", path)
        if api:
            return self._model_info(api.group(1), api.group(2) or "main")
        resolve = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if resolve:
            return self._file(*resolve.groups(), send_body=send_body)
        self._error(404, "", "not a Hub route")

    def _repo(self, repo_id: str, revision: str) -> tuple[HubRepo, str] | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
            self._error(403, "GatedRepo", "Access to this model is restricted")
            return None
        commit = repo.branches.get(revision, revision if revision == repo.commit else None)
        if commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id")
            return None
        return repo, commit

    def _model_info(self, repo_id: str, revision: str) -> None:
        found = self._repo(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        siblings = []
        for name, f in sorted(repo.files.items()):
            sibling = {"rfilename": name, "size": f.size, "blobId": f.git_sha1}
            if f.is_lfs:
                sibling["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            siblings.append(sibling)
        body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": commit, "siblings": siblings})
        self._send(200, body.encode(), {"Content-Type": "application/json"})

    def _file(self, repo_id: str, revision: str, name: str, send_body: bool) -> None:
        found = self._repo(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        f = repo.files.get(name)
        if f is None:
            return self._error(404, "EntryNotFound", "Entry not found")
        start, end = 0, f.size  # [start, end)
        status = 200
        requested = self.headers.get("Range")
        if requested:
            match = re.match(r"^bytes=(\d+)-(\d*)$", requested)
            if not match or int(match.group(1)) >= max(f.size, 1):
                return self._send(416, b"", {"Content-Range": f"bytes */{f.size}"})
            start = int(match.group(1))
            end = min(int(match.group(2)) + 1, f.size) if match.group(2) else f.size
            status = 206
        headers = {
            "ETag": f'"{f.etag}"',
            "X-Repo-Commit": commit,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if f.is_lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{f.size}"
        with self.state.lock:
            drop = None
            offset, times = self.state.drop_at.get(name, (0, 0))
            if start < offset < end and times != 0:
                drop = offset - start
                if times is not None:
                    self.state.drop_at[name] = (offset, times - 1)
            corrupt = self.state.corrupt.get(name, 0) > 0
            if corrupt:
                self.state.corrupt[name] -= 1
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(end - start)}.items():
            self.send_header(key, value)
        self.end_headers()
        sent = 0
        if send_body:
            sent = self._send_range(f.path, start, end, drop, corrupt)
        with self.state.lock:
            self.state.log.append(Served(self.command, repo_id, name, requested, sent))

    def _send_range(self, path: Path, start: int, end: int, drop: int | None, corrupt: bool) -> int:
        count = end - start if drop is None else min(drop, end - start)
        with open(path, "rb") as f:
            if corrupt:
                f.seek(start)
                data = bytearray(f.read(count))
                if data:
                    data[len(data) // 2] ^= 0xFF
                self.wfile.write(bytes(data))
            elif count:
                self.connection.sendfile(f, start, count)
        if drop is not None and count < end - start:
            self.close_connection = True  # the client sees the body end early
        return count

    def _error(self, status: int, code: str, message: str) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class HubServer:
    """`with HubServer() as hub:`; hub.add_repo("org/name", folder) returns the commit; point
    HF_ENDPOINT at hub.url."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        """`host`: where to listen (the e2e cluster's pods reach the host on its bridge)."""
        self.state = HubState()
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer((host, 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add_repo(
        self, repo_id: str, folder: Path, token: str | None = None, tags: tuple[str, ...] = ()
    ) -> str:
        """Serve every file under `folder` as the repository's main branch; returns the commit."""
        files = {
            str(p.relative_to(folder)): describe(p)
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        tree = "".join(f"{name}\0{f.sha256}\n" for name, f in files.items())
        commit = hashlib.sha1(f"{repo_id}\n{tree}".encode()).hexdigest()
        branches = {"main": commit, **{tag: commit for tag in tags}}
        self.state.repos[repo_id] = HubRepo(files, commit, branches, token)
        return commit

    def served(self, name: str | None = None) -> list[Served]:
        with self.state.lock:
            return [s for s in self.state.log if name is None or s.file == name]

    def clear_log(self) -> None:
        with self.state.lock:
            self.state.log.clear()


def main() -> None:
    """Serve a folder as a repository until interrupted (for trying `kvops model pull` by hand)."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo_id")
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    with HubServer() as hub:
        commit = hub.add_repo(args.repo_id, args.folder)
        print(f"HF_ENDPOINT={hub.url} hf://{args.repo_id} at {commit}", flush=True)
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
