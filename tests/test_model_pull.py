"""`kvops model pull` and `--model hf://...` against a local Hub (tests/hub_server.py) serving the
built-in SmolLM2 as a Hugging Face repository: revisions resolved to the commit, a
content-addressed cache, resumption, verification, locking and the one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from hub_server import HubServer
from model_folder import write_smollm2_folder
from serve_process import ServeProcess, engine_answer

from kvops.worker.models.cache import MARKER, boot_id
from kvops.worker.models.fetch import CHUNK
from kvops.worker.models.hf import BLOCK
from kvops.worker.models.sources import ModelSourceError, parse_source

WEIGHTS = "model.safetensors"
KEPT = {WEIGHTS, "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
TOKEN = "hf_test_token"


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory) -> Path:
    return write_smollm2_folder(tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="module")
def hub(smollm2_folder, tmp_path_factory):
    docs_only = tmp_path_factory.mktemp("docs")
    (docs_only / "README.md").write_text("no weights here\n")
    (docs_only / "config.json").write_text("{}")
    with HubServer() as server:
        server.commit = server.add_repo("org/smollm2", smollm2_folder, tags=("v1",))
        server.add_repo("org/gated", smollm2_folder, token=TOKEN)
        server.add_repo("org/docs", docs_only)
        yield server


@pytest.fixture
def fresh_hub(hub):
    hub.clear_log()
    hub.state.drop_at.clear()
    hub.state.corrupt.clear()
    return hub


def kvops(*args: str, hub: HubServer, env: dict[str, str] | None = None) -> subprocess.Popen:
    environment = {**os.environ, "HF_ENDPOINT": hub.url, **(env or {})}
    environment.pop("HF_TOKEN", None)
    environment.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "kvops.worker.serve.cli", *args],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def pull(source: str, cache: Path, *more: str, hub: HubServer, env=None, expect: int = 0):
    process = kvops("model", "pull", source, "--cache", str(cache), *more, hub=hub, env=env)
    out, err = process.communicate(timeout=120)
    assert process.returncode == expect, err[-3000:]
    return (json.loads(out.strip().splitlines()[-1]) if expect == 0 else None), err


def served_bytes(hub: HubServer, name: str) -> int:
    return sum(s.bytes for s in hub.served(name))


def test_sources_parse_and_bad_ones_are_named():
    assert parse_source("hf://org/name@v1.0").revision == "v1.0"
    assert parse_source("hf://org/name").revision is None
    s3 = parse_source("s3://models/smol/v2/")
    assert (s3.location, s3.path, s3.revision) == ("models", "smol/v2", None)
    assert parse_source("s3://models/smol@" + "a" * 40).revision == "a" * 40
    assert parse_source("pvc://claim/a/b").path == "a/b"
    assert parse_source("hf://a/b@x").cache_key == parse_source("hf://a/b@y").cache_key
    for bad, words in [
        ("ftp://x", "unknown scheme"),
        ("hf://org/name@", "empty revision"),
        ("hf://../x", "expected hf://"),
        ("s3://Bad_Bucket/x", "not an S3 bucket name"),
        ("builtin://llama", "built-in models are smollm2"),
        ("pvc://claim/../etc", "expected pvc://"),
    ]:
        with pytest.raises(ModelSourceError, match=words):
            parse_source(bad)


def test_pull_pins_the_commit_keeps_model_files_and_is_a_no_op_the_second_time(
    fresh_hub, smollm2_folder, tmp_path
):
    log = tmp_path / "termination-log"
    result, err = pull(
        "hf://org/smollm2@v1",
        tmp_path / "cache",
        "--progress-interval",
        "0.2",
        "--termination-log",
        str(log),
        hub=fresh_hub,
    )
    assert result["revision"] == fresh_hub.commit
    path = Path(result["path"])
    assert path.name == fresh_hub.commit
    assert {p.name for p in path.iterdir()} == KEPT | {MARKER}  # no README.md
    assert result["files"] == len(KEPT)
    assert result["bytes"] == sum((smollm2_folder / n).stat().st_size for n in KEPT)
    assert result["downloaded"] == result["bytes"]
    assert (path / WEIGHTS).read_bytes() == (smollm2_folder / WEIGHTS).read_bytes()
    assert json.loads(log.read_text()) == result
    # A progress line: bytes, rate (MB/s or, on a fast loopback, GB/s) and ETA.
    assert re.search(r"kvops: pull hf://org/smollm2@v1: .* [\d.]+ [MG]B/s, ETA", err), err
    assert served_bytes(fresh_hub, WEIGHTS) == (smollm2_folder / WEIGHTS).stat().st_size

    # The same revision by its branch: resolved (one API call), nothing fetched.
    fresh_hub.clear_log()
    again, _ = pull("hf://org/smollm2", tmp_path / "cache", hub=fresh_hub)
    assert (again["path"], again["downloaded"]) == (result["path"], 0)
    assert [s.file for s in fresh_hub.served()] == []
    # Pinned to the commit and cached: not even the API is asked.
    pinned, _ = pull(f"hf://org/smollm2@{fresh_hub.commit}", tmp_path / "cache", hub=fresh_hub)
    assert pinned["path"] == result["path"]


@pytest.mark.slow
def test_serve_from_hf_answers_like_the_local_folder(fresh_hub, smollm2_folder, tmp_path):
    from kvops.worker.config import EngineConfig
    from kvops.worker.engine import LLMEngine

    messages = [{"role": "user", "content": "Name a colour."}]
    body = {"model": "m", "messages": messages, "max_tokens": 12, "temperature": 0}
    args = ("--model", "hf://org/smollm2", "--model-cache", str(tmp_path), "--max-model-len", "512")
    with ServeProcess(
        *args, "--served-model-name", "m", env={"HF_ENDPOINT": fresh_hub.url}
    ) as server:
        response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
        answer = response.json()["choices"][0]["message"]["content"]
        log = server.tail()
    local = LLMEngine(EngineConfig(model=str(smollm2_folder), max_model_len=512))
    assert answer and answer == engine_answer(local, messages, 12)
    assert f"hf://org/smollm2 at {fresh_hub.commit}" in log


def test_serve_check_resolves_the_source_without_fetching(fresh_hub, tmp_path):
    process = kvops(
        "serve",
        "--check",
        "--model",
        "hf://org/smollm2",
        "--model-cache",
        str(tmp_path),
        hub=fresh_hub,
    )
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert f"hf://org/smollm2 at {fresh_hub.commit}: 5 files" in out
    assert fresh_hub.served(WEIGHTS) == [] and not any(tmp_path.iterdir())


def test_bad_sources_fail_with_one_clear_line(fresh_hub, tmp_path):
    cases = {
        "hf://org/missing": "unknown repository: org/missing",
        "hf://org/smollm2@no-such-branch": "unknown revision: org/smollm2 has no branch, tag or "
        "commit 'no-such-branch'",
        "hf://org/gated": "access denied: org/gated",
        "hf://org/docs": "no weights among the files: hf://org/docs has no *.safetensors",
    }
    processes = {
        source: kvops("model", "pull", source, "--cache", str(tmp_path), hub=fresh_hub)
        for source in cases
    }
    for source, expected in cases.items():
        _, err = processes[source].communicate(timeout=60)
        assert processes[source].returncode == 2, err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"kvops: error: {expected}"), last
    # The right token opens the gated repository.
    ok = kvops(
        "serve",
        "--check",
        "--model",
        "hf://org/gated",
        "--model-cache",
        str(tmp_path),
        hub=fresh_hub,
        env={"HF_TOKEN": TOKEN},
    )
    out, err = ok.communicate(timeout=60)
    assert ok.returncode == 0, err


def test_a_dropped_connection_resumes_at_the_byte_it_stopped(fresh_hub, smollm2_folder, tmp_path):
    received = CHUNK + 5 * BLOCK  # the client holds whole blocks: these bytes reached the file
    fresh_hub.state.drop_at[WEIGHTS] = (received + 12345, 1)
    result, _ = pull("hf://org/smollm2", tmp_path, hub=fresh_hub)
    ranges = [s.range for s in fresh_hub.served(WEIGHTS)]
    assert f"bytes={received}-{2 * CHUNK - 1}" in ranges  # the retry asked only for the rest
    size = (smollm2_folder / WEIGHTS).stat().st_size
    assert served_bytes(fresh_hub, WEIGHTS) == size + 12345  # only the bytes of a partial block
    assert (Path(result["path"]) / WEIGHTS).read_bytes() == (smollm2_folder / WEIGHTS).read_bytes()


@pytest.mark.slow
def test_an_interrupted_pull_leaves_nothing_loadable_and_resumes(
    fresh_hub, smollm2_folder, tmp_path
):
    offset = 3 * CHUNK + 999
    fresh_hub.state.drop_at[WEIGHTS] = (offset, None)  # until the server heals
    _, err = pull("hf://org/smollm2", tmp_path, hub=fresh_hub, expect=2)
    assert "kvops: error: fetching model.safetensors failed after 5 tries" in err
    entry = next(tmp_path.iterdir()) / fresh_hub.commit
    assert not entry.exists()  # only the .partial folder: nothing a loader would take
    assert (entry.parent / f"{fresh_hub.commit}.partial").is_dir()

    fresh_hub.state.drop_at.clear()
    fresh_hub.clear_log()
    result, _ = pull("hf://org/smollm2", tmp_path, hub=fresh_hub)
    size = (smollm2_folder / WEIGHTS).stat().st_size
    assert served_bytes(fresh_hub, WEIGHTS) == CHUNK  # only the chunk that broke
    assert result["downloaded"] == CHUNK
    assert fresh_hub.served("config.json") == []  # finished before the break
    assert (Path(result["path"]) / WEIGHTS).stat().st_size == size
    assert (Path(result["path"]) / WEIGHTS).read_bytes() == (smollm2_folder / WEIGHTS).read_bytes()


def test_corrupted_files_are_detected_and_fetched_again(fresh_hub, smollm2_folder, tmp_path):
    fresh_hub.state.corrupt["tokenizer.json"] = 1
    result, err = pull("hf://org/smollm2", tmp_path, hub=fresh_hub)
    assert "tokenizer.json failed verification" in err
    assert len(fresh_hub.served("tokenizer.json")) == 2
    cached = Path(result["path"]) / "tokenizer.json"
    assert cached.read_bytes() == (smollm2_folder / "tokenizer.json").read_bytes()

    # A file damaged in the cache: --verify finds it and fetches that file alone.
    data = bytearray(cached.read_bytes())
    data[100] ^= 1
    cached.write_bytes(bytes(data))
    fresh_hub.clear_log()
    again, err = pull("hf://org/smollm2", tmp_path, "--verify", hub=fresh_hub)
    assert "corrupted in the cache" in err
    assert {s.file for s in fresh_hub.served()} == {"tokenizer.json"}
    assert cached.read_bytes() == (smollm2_folder / "tokenizer.json").read_bytes()
    assert again["downloaded"] == cached.stat().st_size

    # A server that keeps sending bad bytes: a checksum error, not a bad cache.
    fresh_hub.state.corrupt["config.json"] = 2
    _, err = pull("hf://org/smollm2", tmp_path / "other", hub=fresh_hub, expect=2)
    assert "kvops: error: checksum mismatch: config.json is git-sha1" in err


def test_a_pull_is_settled_in_its_boot_and_checked_after_a_crash(
    fresh_hub, smollm2_folder, tmp_path
):
    """A pull does not wait for the disk; its marker names the boot (cache.py). The next pull in
    that boot fsyncs and settles it; after a reboot the files are checked first."""
    result, _ = pull("hf://org/smollm2", tmp_path, hub=fresh_hub)
    path = Path(result["path"])
    marker = json.loads((path / MARKER).read_text())
    assert marker["unsynced_boot"] == boot_id()
    assert all(f["digest"] for f in marker["files"])
    pinned = f"hf://org/smollm2@{fresh_hub.commit}"
    pull(pinned, tmp_path, hub=fresh_hub)
    assert "unsynced_boot" not in json.loads((path / MARKER).read_text())

    # The machine went down before the write-back: the weights' last page never reached the disk.
    marker["unsynced_boot"] = "a-boot-before-a-crash"
    (path / MARKER).write_text(json.dumps(marker))
    with open(path / WEIGHTS, "r+b") as weights:
        weights.seek(-100, os.SEEK_END)
        weights.write(bytes(100))
    fresh_hub.clear_log()
    again, err = pull(pinned, tmp_path, hub=fresh_hub)
    assert f"corrupted in the cache, fetching again: ['{WEIGHTS}']" in err
    assert {s.file for s in fresh_hub.served()} == {WEIGHTS}
    assert (path / WEIGHTS).read_bytes() == (smollm2_folder / WEIGHTS).read_bytes()
    assert again["downloaded"] == (path / WEIGHTS).stat().st_size

    # Intact files written in an earlier boot: checked, settled, nothing fetched.
    marker = json.loads((path / MARKER).read_text())
    marker["unsynced_boot"] = "a-boot-before-a-clean-reboot"
    (path / MARKER).write_text(json.dumps(marker))
    fresh_hub.clear_log()
    settled, _ = pull(pinned, tmp_path, hub=fresh_hub)
    assert settled["downloaded"] == 0 and fresh_hub.served() == []
    assert "unsynced_boot" not in json.loads((path / MARKER).read_text())


def test_two_concurrent_pulls_make_one_cache_and_one_download(fresh_hub, smollm2_folder, tmp_path):
    processes = [
        kvops("model", "pull", "hf://org/smollm2", "--cache", str(tmp_path), hub=fresh_hub)
        for _ in range(2)
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["path"] == results[1]["path"]
    assert sorted(r["downloaded"] for r in results) == [0, results[0]["bytes"]]
    for name in KEPT:
        assert served_bytes(fresh_hub, name) == (smollm2_folder / name).stat().st_size, name


def test_pvc_and_builtin_sources_are_read_in_place(smollm2_folder, tmp_path, monkeypatch):
    from kvops.worker.models.pull import pull as pull_source
    from kvops.worker.weights import default_model_path

    builtin = pull_source("builtin://smollm2", str(tmp_path / "cache"))
    assert builtin.path == default_model_path() and builtin.files == 1
    assert not (tmp_path / "cache").exists()  # nothing copied

    monkeypatch.setenv("KVOPS_PVC_ROOT", str(tmp_path))
    (tmp_path / "claim").symlink_to(smollm2_folder)
    on_claim = pull_source("pvc://claim", str(tmp_path / "cache"))
    assert on_claim.path == str(tmp_path / "claim") and on_claim.files == len(KEPT) + 1
    (tmp_path / "other" / "empty").mkdir(parents=True)
    with pytest.raises(ModelSourceError, match="no weights among the files: pvc://other/empty"):
        pull_source("pvc://other/empty")
    with pytest.raises(ModelSourceError, match="is the claim mounted"):
        pull_source("pvc://missing/x")


def test_a_pull_that_cannot_fit_says_disk_full(tmp_path):
    from kvops.worker.models.cache import ensure_free_space

    with pytest.raises(ModelSourceError, match=r"^disk full: the model needs .* GB more in "):
        ensure_free_space(str(tmp_path), 1 << 60)
    ensure_free_space(str(tmp_path), 1 << 20)
