"""`kvops model pull` and `--model SOURCE`: a source, resolved, fetched once into the cache.

result = pull("hf://HuggingFaceTB/SmolLM2-135M-Instruct@main", cache_dir)
result.path       # the local folder (or file) the engine loads
result.revision   # the commit hash (hf), the listing digest (s3)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import TextIO

from kvops.worker.models.cache import (
    OWN_CHECKSUM,
    CacheEntry,
    RemoteFile,
    default_cache_dir,
    ensure_free_space,
    file_digest,
    is_disk_full,
)
from kvops.worker.models.fetch import fetch_all
from kvops.worker.models.progress import Progress
from kvops.worker.models.sources import (
    ModelSource,
    ModelSourceError,
    check_has_weights,
    parse_source,
    pvc_folder,
)

logger = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass
class PullResult:
    """What `kvops model pull` prints as its last line (and writes to --termination-log)."""

    source: str
    revision: str
    path: str
    bytes: int
    files: int
    seconds: float
    downloaded: int = 0  # bytes fetched by this pull (0: all were in the cache)

    def json_line(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def pull(
    text: str,
    cache_dir: str | None = None,
    progress_interval: float = 5.0,
    verify: bool = False,
    out: TextIO | None = None,
) -> PullResult:
    """Make the source's files local; raises ModelSourceError with a one-line reason."""
    start = time.monotonic()
    source = parse_source(text)
    cache_dir = cache_dir or default_cache_dir()
    if source.scheme in ("pvc", "builtin"):
        return _in_place(source, start)
    pinned = _pinned_complete_entry(source, cache_dir)
    if pinned is not None and not verify:  # a commit already cached: no network at all
        with pinned.locked():
            damaged = pinned.settle()
        if not damaged:
            return _result(source, pinned, pinned.marker()["revision"], start, 0)
    remote = _remote(source)
    revision, files = _manifest(remote, source)
    entry = CacheEntry(cache_dir, source.cache_key, revision)
    downloaded = 0
    with entry.locked():
        if entry.is_complete():
            bad = entry.corrupted_files(files) if verify else entry.settle()
            if bad:
                logger.warning("%s: corrupted in the cache, fetching again: %s", source, bad)
                entry.reopen()
                for name in bad:
                    os.remove(entry.partial_path(name))
        if not entry.is_complete():
            pending = [f for f in files if not entry.has_verified(f.name)]
            total = sum(f.size for f in pending)
            try:
                ensure_free_space(entry.group, total - _bytes_on_disk(entry, pending))
                with Progress(str(source), total, progress_interval, out) as progress:
                    digests = fetch_all(remote, entry, files, progress)
                print(progress.line(), file=progress.out, flush=True)
                downloaded = progress.done - progress.resumed
                recorded = [_with_digest(entry, f, digests) for f in files]
                entry.finish(recorded, {"source": str(source), "revision": revision})
            except OSError as error:
                if is_disk_full(error):
                    raise ModelSourceError(
                        f"disk full: writing into {cache_dir}: {error}"
                    ) from None
                raise
    result = _result(source, entry, revision, start, downloaded)
    logger.info("%s at %s in %s (%d bytes fetched)", source, revision, entry.final, downloaded)
    return result


def inspect(text: str, cache_dir: str | None = None) -> PullResult:
    """Resolve the source and list its files without fetching any (`kvops serve --check`)."""
    start = time.monotonic()
    source = parse_source(text)
    if source.scheme in ("pvc", "builtin"):
        return _in_place(source, start)
    revision, files = _manifest(_remote(source), source)
    entry = CacheEntry(cache_dir or default_cache_dir(), source.cache_key, revision)
    return PullResult(
        source=str(source),
        revision=revision,
        path=entry.final,
        bytes=sum(f.size for f in files),
        files=len(files),
        seconds=round(time.monotonic() - start, 3),
    )


def _remote(source: ModelSource):
    if source.scheme == "hf":
        from kvops.worker.models.hf import HubRepo  # huggingface_hub only for hf://

        return HubRepo(source)
    from kvops.worker.models.s3 import S3Prefix  # boto3 only for s3://

    return S3Prefix(source)


def _manifest(remote, source: ModelSource) -> tuple[str, list[RemoteFile]]:
    revision, files = remote.manifest()
    if source.scheme == "s3" and source.revision and revision != source.revision:
        raise ModelSourceError(
            f"unknown revision: {source.unpinned} now lists as {revision}, not {source.revision} "
            "(an object changed since)"
        )
    check_has_weights(source, [f.name for f in files])
    return revision, files


def _pinned_complete_entry(source: ModelSource, cache_dir: str) -> CacheEntry | None:
    if source.revision is None or not _COMMIT.match(source.revision):
        return None
    entry = CacheEntry(cache_dir, source.cache_key, source.revision)
    return entry if entry.is_complete() else None


def _with_digest(
    entry: CacheEntry, remote: RemoteFile, fetched: dict[str, tuple[str, str]]
) -> RemoteFile:
    """The file as the marker records it: with the source's checksum, else the one computed
    while fetching it, else (verified by an earlier, interrupted pull) one computed now."""
    if remote.digest is not None:
        return remote
    digest = fetched.get(remote.name)
    if digest is None:
        path = entry.partial_path(remote.name)
        digest = (OWN_CHECKSUM, file_digest(path, OWN_CHECKSUM))
    return dataclasses.replace(remote, digest=digest)


def _bytes_on_disk(entry: CacheEntry, files: list[RemoteFile]) -> int:
    """Bytes the partial files of an interrupted pull already hold (they are sparse)."""
    held = 0
    for f in files:
        with contextlib.suppress(FileNotFoundError):
            held += os.stat(entry.partial_path(f.name) + ".incomplete").st_blocks * 512
    return held


def _result(
    source: ModelSource, entry: CacheEntry, revision: str, start: float, downloaded: int
) -> PullResult:
    files = entry.marker()["files"]
    return PullResult(
        source=str(source),
        revision=revision,
        path=entry.final,
        bytes=sum(f["size"] for f in files),
        files=len(files),
        seconds=round(time.monotonic() - start, 3),
        downloaded=downloaded,
    )


def _in_place(source: ModelSource, start: float) -> PullResult:
    """pvc:// and builtin:// need no copy: the result names the files where they lie."""
    if source.scheme == "builtin":
        from importlib.metadata import version

        from kvops.worker.weights import DEFAULT_MODEL_PACKAGE, default_model_path

        try:
            path = default_model_path()
        except FileNotFoundError as error:
            raise ModelSourceError(str(error)) from None
        revision = version(DEFAULT_MODEL_PACKAGE.replace("_", "-"))
        names = [os.path.basename(path)]
        sizes = [os.path.getsize(path)]
    else:
        path = pvc_folder(source)
        if not os.path.isdir(path):
            raise ModelSourceError(f"{source}: {path} does not exist (is the claim mounted?)")
        names, sizes = [], []
        for folder, _, filenames in os.walk(path):
            for filename in filenames:
                full = os.path.join(folder, filename)
                names.append(os.path.relpath(full, path))
                sizes.append(os.path.getsize(full))
        check_has_weights(source, names)
        revision = "in-place"
    return PullResult(
        source=str(source),
        revision=revision,
        path=path,
        bytes=sum(sizes),
        files=len(names),
        seconds=round(time.monotonic() - start, 3),
    )
