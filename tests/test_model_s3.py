"""s3:// sources against a real S3 server (MinIO, tests/s3_server.py): credentials and endpoint
from the standard AWS variables, the same files and answers as the local folder, clear errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from model_folder import write_smollm2_folder
from s3_server import MinioServer

from kvops.worker.models.cache import MARKER

KEPT = {
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory) -> Path:
    return write_smollm2_folder(tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="module")
def s3(smollm2_folder, tmp_path_factory):
    with MinioServer(tmp_path_factory.mktemp("minio")) as server:
        client = server.client()
        client.create_bucket(Bucket="models")
        client.create_bucket(Bucket="empty")
        for path in smollm2_folder.iterdir():
            # model.safetensors goes up in parts (a multipart ETag: size-checked), the rest whole
            # (an MD5 ETag: checksummed).
            client.upload_file(str(path), "models", f"smollm2/{path.name}")
        client.put_object(Bucket="models", Key="docs/README.md", Body=b"no weights\n")
        yield server


def kvops(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return subprocess.run(
        [sys.executable, "-m", "kvops.worker.serve.cli", *args],
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_pull_from_s3_copies_the_model_files_once(s3, smollm2_folder, tmp_path):
    done = kvops("model", "pull", "s3://models/smollm2", "--cache", str(tmp_path), env=s3.env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert re.fullmatch(r"[0-9a-f]{40}", result["revision"])
    path = Path(result["path"])
    assert {p.name for p in path.iterdir()} == KEPT | {MARKER}
    for name in KEPT:
        assert (path / name).read_bytes() == (smollm2_folder / name).read_bytes(), name
    # The weights go up in parts (their ETag is no MD5): the pull checksums them for the marker.
    marker = json.loads((path / MARKER).read_text())
    recorded = {f["name"]: f["digest"] for f in marker["files"]}
    weights = zlib.crc32((smollm2_folder / "model.safetensors").read_bytes())
    assert recorded["model.safetensors"] == ["crc32", f"{weights:08x}"]
    assert all(recorded.values())
    again = kvops("model", "pull", "s3://models/smollm2/", "--cache", str(tmp_path), env=s3.env)
    assert json.loads(again.stdout.strip().splitlines()[-1])["downloaded"] == 0
    assert json.loads(again.stdout.strip().splitlines()[-1])["path"] == result["path"]
    # Pinned to the digest it reported: served from the cache without listing (no endpoint).
    pinned_source = f"s3://models/smollm2@{result['revision']}"
    pinned = kvops("model", "pull", pinned_source, "--cache", str(tmp_path), env={})
    assert pinned.returncode == 0, pinned.stderr
    assert json.loads(pinned.stdout.strip().splitlines()[-1])["path"] == result["path"]
    stale = kvops("model", "pull", "s3://models/smollm2@" + "0" * 40, "--cache", str(tmp_path),
                  env=s3.env)  # fmt: skip
    assert stale.returncode == 2
    assert "kvops: error: unknown revision: s3://models/smollm2 now lists as" in stale.stderr

    # That checksum is what catches a torn file after a crash (the pull never fsynced it).
    marker["unsynced_boot"] = "a-boot-before-a-crash"
    (path / MARKER).write_text(json.dumps(marker))
    with open(path / "model.safetensors", "r+b") as torn:
        torn.seek(-100, os.SEEK_END)
        torn.write(bytes(100))
    healed = kvops("model", "pull", "s3://models/smollm2", "--cache", str(tmp_path), env=s3.env)
    assert "corrupted in the cache, fetching again: ['model.safetensors']" in healed.stderr
    assert json.loads(healed.stdout.strip().splitlines()[-1])["downloaded"] > 0
    assert (path / "model.safetensors").read_bytes() == (
        smollm2_folder / "model.safetensors"
    ).read_bytes()


@pytest.mark.slow
def test_generate_from_s3_answers_like_the_local_folder(s3, smollm2_folder, tmp_path):
    common = ("--max-tokens", "12", "--max-model-len", "512", "Name a colour.")
    from_s3 = kvops(
        "generate",
        "--model",
        "s3://models/smollm2",
        "--model-cache",
        str(tmp_path),
        *common,
        env=s3.env,
    )
    local = kvops("generate", "--model", str(smollm2_folder), *common, env={})
    assert from_s3.returncode == 0 and local.returncode == 0, from_s3.stderr + local.stderr
    assert from_s3.stdout.strip() and from_s3.stdout == local.stdout


def test_bad_s3_sources_fail_with_one_clear_line(s3, tmp_path):
    cases = [
        (
            "s3://models/smollm2",
            {"AWS_SECRET_ACCESS_KEY": "wrong-secret"},
            "access denied: the AWS credentials may not read s3://models/smollm2",
        ),
        ("s3://models/smollm2", {"AWS_ACCESS_KEY_ID": "nobody"}, "access denied"),
        ("s3://empty/x", {}, "bucket or prefix empty: nothing under s3://empty/x"),
        ("s3://no-such-bucket/x", {}, "bucket or prefix empty: the bucket no-such-bucket does not"),
        ("s3://models/docs", {}, "no weights among the files: s3://models/docs"),
    ]
    for source, env, expected in cases:
        done = kvops("model", "pull", source, "--cache", str(tmp_path), env={**s3.env, **env})
        assert done.returncode == 2, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"kvops: error: {expected}"), last
