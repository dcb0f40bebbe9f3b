"""hf:// sources: a Hub repository's revision, listed through huggingface_hub, fetched by urllib3.

huggingface_hub reads HF_ENDPOINT and HF_TOKEN itself and resolves the revision (a branch, tag or
commit) to the commit hash the Hub announces; LFS files are verified by their sha256, the others
by their git blob id. The bytes come over urllib3 instead of huggingface_hub's session: streaming
through its httpx2 session took about twice the CPU a byte of urllib3's large reads (which boto3
uses for s3://) and held a pull to 0.37 of curl's rate (bench/results/README.md, model_pull).
A file's `resolve` URL usually redirects to a CDN; the redirect is followed by hand so that the
token goes to the Hub's own host only, and the signed location is kept for the file's other
ranges (asked for again once it has expired).
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx2  # huggingface_hub's HTTP client (2.x): what its API calls fail with
import urllib3
from huggingface_hub import HfApi, constants, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers

from kvops.worker.models.cache import RemoteFile
from kvops.worker.models.fetch import WORKERS, ShortRead
from kvops.worker.models.sources import ModelSource, ModelSourceError, is_wanted

# The Hub API calls' INFO lines (one a request) are noise beside the progress lines.
logging.getLogger("httpx2").setLevel(logging.WARNING)

TIMEOUT = urllib3.Timeout(connect=20.0, read=60.0)
BLOCK = 1 << 20  # a read; an interrupted range resumes after the last whole block
REDIRECTS = 5
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)


class ServerError(ConnectionError):
    """A 5xx answer: worth retrying."""


class LinkExpired(ConnectionError):
    """The redirected (signed) location of a file refused a range: resolve it again."""


class HubRepo:
    """One hf:// source: `manifest()` resolves it, `read_range()` fetches from the resolved
    commit (never the branch, which may move during the pull)."""

    retryable = (
        urllib3.exceptions.ProtocolError,
        urllib3.exceptions.TimeoutError,  # connect and read timeouts, refused connections
        ShortRead,
        ServerError,
        LinkExpired,
    )

    def __init__(self, source: ModelSource):
        self.source = source
        self.repo = source.location
        self.commit: str | None = None
        self.hub_origin = _origin(constants.ENDPOINT)
        self.locations: dict[str, str] = {}  # file -> where its resolve URL redirected
        self.hub_headers: dict[str, str] = {}  # the user agent and the token (once per pull)
        self.lock = threading.Lock()
        self.pools = _Pools()

    def manifest(self) -> tuple[str, list[RemoteFile]]:
        """(commit hash, the allowed files with their sizes and checksums)."""
        try:
            info = HfApi().model_info(self.repo, revision=self.source.revision, files_metadata=True)
        except GatedRepoError:
            raise self._access_denied() from None
        except RepositoryNotFoundError:
            raise ModelSourceError(
                f"unknown repository: {self.repo} on {constants.ENDPOINT} (if it is private, "
                "HF_TOKEN must grant access to it)"
            ) from None
        except RevisionNotFoundError:
            raise ModelSourceError(
                f"unknown revision: {self.repo} has no branch, tag or commit "
                f"{self.source.revision!r}"
            ) from None
        except HfHubHTTPError as error:
            raise self._http_error(error) from None
        except (httpx2.TransportError, OfflineModeIsEnabled) as error:
            raise ModelSourceError(f"cannot reach {constants.ENDPOINT}: {error}") from None
        if not info.sha:
            raise ModelSourceError(f"{constants.ENDPOINT} announced no commit for {self.source}")
        self.commit = info.sha
        self.hub_headers = build_hf_headers()
        files = []
        for sibling in info.siblings or []:
            if not is_wanted(sibling.rfilename):
                continue
            if sibling.size is None:
                raise ModelSourceError(
                    f"{self.source}: the Hub gave no size for {sibling.rfilename}"
                )
            if sibling.lfs is not None:
                digest = ("sha256", sibling.lfs.sha256)
            elif sibling.blob_id:
                digest = ("git-sha1", sibling.blob_id)
            else:
                digest = None
            files.append(RemoteFile(sibling.rfilename, sibling.size, digest))
        return info.sha, files

    def read_range(self, remote: RemoteFile, start: int, end: int) -> Iterator[bytes]:
        response = self._open(remote, {"Range": f"bytes={start}-{end - 1}"})
        read_to_the_end = False
        try:
            if response.status == 200 and start > 0:
                raise ModelSourceError(f"{self.source}: the server ignores byte ranges")
            while block := response.read(BLOCK, decode_content=False):
                if len(block) < BLOCK and response.length_remaining:
                    # Cut short by a broken connection. The part is dropped: a range resumes
                    # after whole blocks, as it did over huggingface_hub's session (the
                    # resumption tests and their fault-injecting server count on it).
                    raise ShortRead(f"{remote.name}: the connection broke mid-range")
                yield block
            read_to_the_end = True
        finally:
            # A fully read body hands its connection back; one left mid-way must not be reused.
            if not read_to_the_end:
                response.close()
            response.release_conn()

    def _open(self, remote: RemoteFile, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        """The response to a GET of the file, after the redirects (the last location is kept)."""
        assert self.commit is not None, "manifest() first"
        with self.lock:
            url = self.locations.get(remote.name)
        if url is None:
            url = hf_hub_url(self.repo, remote.name, revision=self.commit)
        for _ in range(REDIRECTS + 1):
            on_hub = _origin(url) == self.hub_origin
            sent = {**headers, "Accept-Encoding": "identity"}
            if on_hub:
                sent.update(self.hub_headers)  # the token: to the Hub, never to a CDN
            response = self.pools.get(url).request(
                "GET", url, headers=sent, redirect=False, retries=False,
                timeout=TIMEOUT, preload_content=False,
            )  # fmt: skip
            if response.status in _REDIRECT_STATUSES and response.headers.get("Location"):
                response.drain_conn()
                response.release_conn()
                url = urljoin(url, response.headers["Location"])
                continue
            if response.status < 400:
                if not on_hub:
                    with self.lock:
                        self.locations[remote.name] = url
                return response
            response.drain_conn()
            response.release_conn()
            if response.status >= 500:
                raise ServerError(f"{response.status} from {_origin(url)} for {remote.name}")
            if not on_hub:  # an expired signature, most likely
                with self.lock:
                    self.locations.pop(remote.name, None)
                raise LinkExpired(f"{response.status} from {_origin(url)} for {remote.name}")
            raise self._file_error(remote, response)
        raise ModelSourceError(f"{self.source}: more than {REDIRECTS} redirects for {remote.name}")

    def _file_error(self, remote: RemoteFile, response: urllib3.BaseHTTPResponse) -> Exception:
        code = response.headers.get("X-Error-Code", "")
        if response.status in (401, 403) or code == "GatedRepo":
            return self._access_denied()
        message = response.headers.get("X-Error-Message") or response.reason or code
        return ModelSourceError(f"{self.source}: {response.status} {message} for {remote.name}")

    def _access_denied(self) -> ModelSourceError:
        return ModelSourceError(
            f"access denied: {self.repo} on {constants.ENDPOINT} is gated or private and HF_TOKEN "
            "does not grant access to it"
        )

    def _http_error(self, error: HfHubHTTPError) -> ModelSourceError:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            return self._access_denied()
        first_line = str(error).strip().splitlines()[0]
        return ModelSourceError(f"{self.source}: {first_line}")


class _Pools:
    """urllib3 connection pools, one connection per fetching thread and host, through the proxy
    that HTTPS_PROXY / HTTP_PROXY / NO_PROXY name. TLS trusts the system's certificates
    (SSL_CERT_FILE / SSL_CERT_DIR), as huggingface_hub's session (truststore) does."""

    def __init__(self) -> None:
        options: dict[str, Any] = {"maxsize": WORKERS}
        self.direct = urllib3.PoolManager(**options)
        self.proxies = urllib.request.getproxies()
        self.via_proxy = {
            proxy: urllib3.ProxyManager(proxy, **options)
            for scheme, proxy in self.proxies.items()
            if scheme in ("http", "https")
        }

    def get(self, url: str) -> urllib3.PoolManager:
        parts = urlsplit(url)
        proxy = self.proxies.get(parts.scheme)
        if proxy in self.via_proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
            return self.via_proxy[proxy]
        return self.direct


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.lower()}"
