"""Parallel, resumable, ranged fetching of a revision's files into a partial cache entry.

Each file is split into CHUNK-sized ranges fetched by a pool of threads and written in place
(pwrite) into `<name>.incomplete`; every finished chunk is appended to `<name>.incomplete.chunks`,
so a pull that is killed resumes with the chunks it lacks, and a range interrupted mid-way is
retried from the byte where it stopped. The checksum is computed while the download runs (each
chunk as soon as those before it are written, mapped from the page cache), so a complete file
is verified at once and renamed into place; a file that fails verification is fetched once more
before the pull gives up. A file whose source publishes no checksum gets one all the same
(cache.OWN_CHECKSUM): the cache's marker records it (a later boot checks the files against it).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Protocol

from kvops.worker.models.cache import (
    CHUNKS,
    INCOMPLETE,
    OWN_CHECKSUM,
    CacheEntry,
    RemoteFile,
    new_hash,
)
from kvops.worker.models.progress import Progress
from kvops.worker.models.sources import ModelSourceError

logger = logging.getLogger(__name__)

CHUNK = 8 << 20
WRITE = 256 << 10  # the largest pwrite (see _write)
# Ranges in flight: two per CPU (one waits on the network while the other copies and hashes), at
# most eight. On a 2-CPU machine eight streams spent their time spinning on the file's inode
# lock and lost 10-25% against four (bench/results/README.md, model_pull).
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
WORKERS = min(8, 2 * (_CPUS or 1))  # (macOS has no sched_getaffinity)
RETRIES = 4  # per range, with exponential backoff from RETRY_DELAY
RETRY_DELAY = 0.2


class RangeReader(Protocol):
    """What a source implements: the bytes [start, end) of one file, as an iterator of blocks.
    Transient failures raise one of `retryable`; anything else ends the pull."""

    retryable: tuple[type[BaseException], ...]

    def read_range(self, remote: RemoteFile, start: int, end: int) -> Iterator[bytes]: ...


class ShortRead(ConnectionError):
    """The server closed a range before its last byte."""


class _OpenFile:
    """A file being fetched: its descriptor, its chunk log and the chunks still missing."""

    def __init__(self, entry: CacheEntry, remote: RemoteFile):
        self.remote = remote
        self.final = entry.partial_path(remote.name)
        self.temp = self.final + INCOMPLETE
        self.chunk_log = self.temp + CHUNKS
        os.makedirs(os.path.dirname(self.final), exist_ok=True)
        done: set[int] = set()
        if os.path.exists(self.temp) and os.path.getsize(self.temp) == remote.size:
            try:
                with open(self.chunk_log, encoding="ascii") as f:
                    done = {int(line) for line in f if line.strip().isdigit()}
            except FileNotFoundError:
                pass
        else:
            done = set()
            _remove(self.chunk_log)
        self.fd = os.open(self.temp, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self.fd, remote.size)
        chunks = (remote.size + CHUNK - 1) // CHUNK
        self.missing = [i for i in range(chunks) if i not in done]
        self.left = len(self.missing)
        self.resumed_bytes = remote.size - sum(_chunk_len(remote.size, i) for i in self.missing)
        self.lock = threading.Lock()
        self.done = done
        self.algorithm = remote.digest[0] if remote.digest else OWN_CHECKSUM
        self.hash = new_hash(self.algorithm, remote.size)
        self.hashed = 0  # chunks [0, hashed) are in self.hash
        self.hash_lock = threading.Lock()

    def chunk_done(self, index: int) -> bool:
        """Record a written chunk; True when it was the file's last. (A chunk logged but lost to
        a power cut fails the file's checksum and is fetched again.)"""
        with self.lock:
            with open(self.chunk_log, "a", encoding="ascii") as f:
                f.write(f"{index}\n")
            self.done.add(index)
            self.left -= 1
            last = self.left == 0
        if not last:
            self.hash_written(wait=False)
        return last

    def hash_written(self, wait: bool) -> None:
        """Feed the hash the written chunks that follow those it has seen. One thread hashes at a
        time; the others go back to fetching (`wait`: finish the file's hash now)."""
        if not self.hash_lock.acquire(blocking=wait):
            return
        try:
            while True:
                with self.lock:
                    if self.hashed not in self.done:
                        return
                start, length = self.hashed * CHUNK, _chunk_len(self.remote.size, self.hashed)
                if os.fstat(self.fd).st_size < start + length:
                    # (a mapping past the end would kill the process with SIGBUS)
                    raise OSError(f"{self.temp}: shorter than its chunk log says")
                # Hashed where the page cache holds it: reading it into a buffer first was a
                # tenth of a pull's CPU (a copy of every byte) on a 2-core machine.
                with mmap.mmap(self.fd, length, offset=start, access=mmap.ACCESS_READ) as chunk:
                    self.hash.update(chunk)
                self.hashed += 1
        finally:
            self.hash_lock.release()

    def problem(self) -> str | None:
        """None if the written file is what the source announced, else what differs."""
        size = os.fstat(self.fd).st_size
        if size != self.remote.size:
            return f"{size} bytes, expected {self.remote.size}"
        self.hash_written(wait=True)
        actual = self.hash.hexdigest()
        if self.remote.digest is None or actual == self.remote.digest[1]:
            return None
        return f"{self.algorithm} {actual}, expected {self.remote.digest[1]}"

    def digest(self) -> tuple[str, str]:
        return self.algorithm, self.hash.hexdigest()

    def close(self) -> None:
        os.close(self.fd)


def fetch_all(
    reader: RangeReader, entry: CacheEntry, files: list[RemoteFile], progress: Progress
) -> dict[str, tuple[str, str]]:
    """Fetch every file of `files` the partial entry lacks, verified; raise ModelSourceError.
    Returns the digest of each file fetched: {name: (algorithm, hex)}."""
    digests: dict[str, tuple[str, str]] = {}
    for attempt in range(2):
        pending = [f for f in files if not entry.has_verified(f.name)]
        if not pending:
            return digests
        failed = _fetch_round(reader, entry, pending, progress, digests)
        if not failed:
            return digests
        if attempt == 0:
            for name, why in failed.items():
                logger.warning("%s failed verification (%s); fetching it again", name, why)
    name, why = next(iter(failed.items()))
    raise ModelSourceError(f"checksum mismatch: {name} is {why} (fetched twice)")


def _fetch_round(
    reader: RangeReader,
    entry: CacheEntry,
    files: list[RemoteFile],
    progress: Progress,
    digests: dict[str, tuple[str, str]],
) -> dict[str, str]:
    """One pass over `files`; returns {name: what differs} for those that failed verification
    and adds the digests of those that passed to `digests`."""
    opened = [_OpenFile(entry, remote) for remote in files]
    failed: dict[str, str] = {}
    stop = threading.Event()

    def finish(file: _OpenFile) -> None:
        problem = file.problem()
        if problem is None:
            digests[file.remote.name] = file.digest()
            os.replace(file.temp, file.final)
            _remove(file.chunk_log)
        else:
            failed[file.remote.name] = problem
            _remove(file.temp)
            _remove(file.chunk_log)

    def fetch_chunk(file: _OpenFile, index: int) -> None:
        start = index * CHUNK
        end = start + _chunk_len(file.remote.size, index)
        offset = start
        for attempt in range(RETRIES + 1):
            try:
                for block in reader.read_range(file.remote, offset, end):
                    if stop.is_set():
                        return
                    block = block[: end - offset]
                    _write(file.fd, block, offset)
                    offset += len(block)
                    progress.add(len(block))
                    if offset >= end:  # a server that ignored the range sends on
                        break
                if offset < end:
                    raise ShortRead(f"{file.remote.name}: the server closed the range early")
                break
            except reader.retryable as error:
                if attempt == RETRIES or stop.is_set():
                    raise ModelSourceError(
                        f"fetching {file.remote.name} failed after {RETRIES + 1} tries: {error}"
                    ) from error
                logger.info("%s: %s; resuming at byte %d", file.remote.name, error, offset)
                time.sleep(RETRY_DELAY * 2**attempt)
        if file.chunk_done(index):
            finish(file)

    try:
        for file in opened:
            progress.add_resumed(file.resumed_bytes)
            if file.left == 0:
                finish(file)
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="pull") as pool:
            futures = [
                pool.submit(fetch_chunk, file, index) for file in opened for index in file.missing
            ]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            errors = [f.exception() for f in done if f.exception() is not None]
            if errors:
                stop.set()
                for future in futures:
                    future.cancel()
                raise errors[0]  # type: ignore[misc]
    finally:
        for file in opened:
            file.close()
    return failed


def _write(fd: int, block: bytes, offset: int) -> None:
    """pwrite in WRITE-sized pieces. The kernel gives a write a page-cache folio as large as the
    write; on a VM that hands free memory back to its host (virtio-balloon free page reporting,
    as on the bench machine) large folios come from the handed-back blocks and every first touch
    faults in the host: 1 MiB writes after another program freed its pages ran at half of
    curl's speed, spending 40% of the pull copying into the page cache (perf); curl's 16 KiB
    writes and these 256 KiB pieces never did (bench/results/README.md, model_pull)."""
    view = memoryview(block)
    at = 0
    while at < len(view):
        at += os.pwrite(fd, view[at : at + WRITE], offset + at)


def _chunk_len(size: int, index: int) -> int:
    return min(CHUNK, size - index * CHUNK)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
