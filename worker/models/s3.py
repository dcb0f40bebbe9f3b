"""s3:// sources: the objects under a prefix, listed and fetched with boto3.

boto3 takes the endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), region and credentials from
the standard AWS variables and files. The revision is a digest of the listing (key, ETag, size of
every object), so a changed object makes a new cache entry. Ranged GETs carry If-Match with the
listed ETag, so a file overwritten during the pull fails rather than mixing two versions; a
single-part upload's ETag is its MD5, which verifies the file.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from kvops.worker.models.cache import RemoteFile
from kvops.worker.models.fetch import WORKERS, ShortRead
from kvops.worker.models.sources import ModelSource, ModelSourceError, is_wanted

_MD5 = re.compile(r"^[0-9a-f]{32}$")
DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "401"}
BLOCK = 1 << 20


class ServerError(ConnectionError):
    """A 5xx answer: worth retrying."""


class S3Prefix:
    retryable = (
        BotoConnectionError,
        ReadTimeoutError,
        ResponseStreamingError,
        ShortRead,
        ServerError,
    )

    def __init__(self, source: ModelSource):
        self.source = source
        self.bucket = source.location
        self.prefix = f"{source.path}/" if source.path else ""
        self.etags: dict[str, str] = {}
        self.client = boto3.client(
            "s3",
            config=Config(max_pool_connections=WORKERS * 2, retries={"mode": "standard"}),
        )

    def manifest(self) -> tuple[str, list[RemoteFile]]:
        objects = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                objects.extend(page.get("Contents", []))
        except NoCredentialsError:
            raise ModelSourceError(
                f"access denied: no AWS credentials for {self.source} (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY)"
            ) from None
        except ClientError as error:
            raise self._client_error(error) from None
        except BotoCoreError as error:
            raise ModelSourceError(f"{self.source}: {error}") from None
        if not objects:
            raise ModelSourceError(f"bucket or prefix empty: nothing under {self.source}")
        listing = hashlib.sha256()
        files = []
        for obj in sorted(objects, key=lambda o: o["Key"]):
            name = obj["Key"][len(self.prefix) :]
            etag = obj["ETag"].strip('"')
            listing.update(f"{name}\0{etag}\0{obj['Size']}\n".encode())
            if not name or name.endswith("/") or not is_wanted(name):
                continue
            self.etags[name] = obj["ETag"]
            digest = ("md5", etag) if _MD5.match(etag) else None  # multipart: size only
            files.append(RemoteFile(name, obj["Size"], digest))
        return listing.hexdigest()[:40], files

    def read_range(self, remote: RemoteFile, start: int, end: int) -> Iterator[bytes]:
        try:
            response = self.client.get_object(
                Bucket=self.bucket,
                Key=self.prefix + remote.name,
                Range=f"bytes={start}-{end - 1}",
                IfMatch=self.etags[remote.name],
            )
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if str(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")).startswith(
                "5"
            ):
                raise ServerError(f"{code} for {remote.name}") from None
            if code in ("PreconditionFailed", "412"):
                raise ModelSourceError(
                    f"{self.source}: {remote.name} changed during the pull; pull again"
                ) from None
            raise self._client_error(error) from None
        body = response["Body"]
        try:
            yield from body.iter_chunks(BLOCK)
        finally:
            body.close()

    def _client_error(self, error: ClientError) -> ModelSourceError:
        code = error.response.get("Error", {}).get("Code", "")
        if code in DENIED:
            return ModelSourceError(
                f"access denied: the AWS credentials may not read {self.source} ({code})"
            )
        if code in ("NoSuchBucket", "404"):
            return ModelSourceError(
                f"bucket or prefix empty: the bucket {self.bucket} does not exist"
            )
        return ModelSourceError(f"{self.source}: {code}: {error}")
