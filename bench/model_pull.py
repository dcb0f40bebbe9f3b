"""Model pull throughput: `kvops model pull` against `curl` of the same files, same servers, same
run. The model: SmolLM2-360M's architecture (32 layers, hidden 960) with random float32 weights,
one 1.45 GB safetensors file plus the SmolLM2 config and tokenizer files, written at bench time
into a temporary folder (removed after). It is served by the test Hub (tests/hub_server.py,
sendfile) and by MinIO (tests/s3_server.py), one source after the other with only its own server
running. Each repetition curls every file one after the other into an empty folder and pulls into
an empty cache, alternating which goes first.

A pull ends with every file verified: an hf:// pull checks every byte against the Hub's LFS
sha256; the s3:// weights go up in parts (their ETag is no MD5), so that pull checks their size
and records a CRC-32 of its own for the cache's marker. It does not fsync the data (the marker
names the boot it was written in; the next pull settles it). curl does none of this; for scale,
`curl_sync_s` adds `sync` of the curled files and `curl_verified_s` then hashes the weights with
`openssl sha256` (the OpenSSL code hashlib runs). Three kvops figures:
  kvops_wall_MBps      the `kvops model pull` process, start-up and imports included (end to end);
                       this is the figure held against curl's
  kvops_MBps           the pull's own `seconds` (resolving the revision, fetching, verifying,
                       finishing the entry)
  kvops_transfer_MBps  the rate of the pull's last progress line (fetch and verify only)

    python bench/model_pull.py --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from hub_server import HubServer  # noqa: E402
from model_folder import write_smollm2_folder  # noqa: E402
from records import write_record  # noqa: E402
from s3_server import ACCESS_KEY, SECRET_KEY, MinioServer  # noqa: E402

KEPT = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]  # fmt: skip
# SmolLM2-360M (HuggingFaceTB/SmolLM2-360M-Instruct): what differs from the built-in 135M.
SMOLLM2_360M = {"hidden_size": 960, "intermediate_size": 2560, "num_attention_heads": 15,
                "num_key_value_heads": 5, "num_hidden_layers": 32}  # fmt: skip


def write_bench_model(folder: Path) -> Path:
    """The SmolLM2 folder (config, tokenizer) with SmolLM2-360M's shapes and random weights."""
    import torch
    from safetensors.torch import save_file

    write_smollm2_folder(folder)
    config = {**json.loads((folder / "config.json").read_text()), **SMOLLM2_360M}
    config["torch_dtype"] = "float32"
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    shapes = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes |= {
            f"{layer}.self_attn.q_proj.weight": (hidden, hidden),
            f"{layer}.self_attn.k_proj.weight": (kv, hidden),
            f"{layer}.self_attn.v_proj.weight": (kv, hidden),
            f"{layer}.self_attn.o_proj.weight": (hidden, hidden),
            f"{layer}.mlp.gate_proj.weight": (inner, hidden),
            f"{layer}.mlp.up_proj.weight": (inner, hidden),
            f"{layer}.mlp.down_proj.weight": (hidden, inner),
            f"{layer}.input_layernorm.weight": (hidden,),
            f"{layer}.post_attention_layernorm.weight": (hidden,),
        }
    generator = torch.Generator().manual_seed(0)
    tensors = {
        name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()
    }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def curl(urls: dict[str, str], into: Path, extra: list[str]) -> tuple[float, float, float]:
    """Seconds to curl every file; to curl and sync them to disk; to curl them, sync them and
    hash the weights."""
    start = time.monotonic()
    for name, url in urls.items():
        subprocess.run(["curl", "-sSf", "-o", str(into / name), *extra, url], check=True)
    fetched = time.monotonic() - start
    subprocess.run(["sync", *(str(into / name) for name in urls)], check=True)
    synced = time.monotonic() - start
    hashed = time.monotonic()
    weights = [str(into / name) for name in urls if name.endswith(".safetensors")]
    subprocess.run(["openssl", "sha256", *weights], check=True, capture_output=True)
    return fetched, synced, synced + time.monotonic() - hashed


def kvops_pull(source: str, cache: Path, env: dict[str, str]) -> tuple[float, dict, float]:
    """(wall seconds, the JSON line, the last progress line's rate in MB/s)."""
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "kvops.worker.serve.cli", "model", "pull", source, "--cache",
         str(cache), "--progress-interval", "60"],
        env={**os.environ, **env}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    wall = time.monotonic() - start
    progress = [line for line in done.stderr.splitlines() if line.startswith("kvops: pull ")]
    rate = re.search(r", ([\d.]+) ([MG])B/s, ETA", progress[-1])
    assert rate, progress[-1]
    mbps = float(rate.group(1)) * (1000 if rate.group(2) == "G" else 1)
    return wall, json.loads(done.stdout.strip().splitlines()[-1]), mbps


def measure(kind: str, setup: tuple, repetition: int, size: int, scratch: Path) -> dict:
    source, env, urls, curl_args = setup
    timings: dict[str, tuple] = {}
    order = ("curl", "kvops") if repetition % 2 == 0 else ("kvops", "curl")
    for tool in order:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        if tool == "curl":
            timings[tool] = curl(urls, scratch, curl_args)
        else:
            timings[tool] = kvops_pull(source, scratch, env)
    shutil.rmtree(scratch)
    curl_seconds, curl_sync_seconds, curl_verified_seconds = timings["curl"]
    wall, result, transfer_rate = timings["kvops"]
    assert result["bytes"] == size and result["downloaded"] == size, result
    return {
        "source": kind,
        "repetition": repetition,
        "first": order[0],
        "bytes": size,
        "curl_s": round(curl_seconds, 3),
        "curl_sync_s": round(curl_sync_seconds, 3),
        "curl_verified_s": round(curl_verified_seconds, 3),
        "kvops_pull_s": result["seconds"],  # resolve + fetch + verify + finish
        "kvops_wall_s": round(wall, 3),  # plus the interpreter's start-up and imports
        "curl_MBps": round(size / curl_seconds / 1e6, 1),
        "curl_sync_MBps": round(size / curl_sync_seconds / 1e6, 1),
        "curl_verified_MBps": round(size / curl_verified_seconds / 1e6, 1),
        "kvops_wall_MBps": round(size / wall / 1e6, 1),
        "kvops_MBps": round(size / result["seconds"] / 1e6, 1),
        "kvops_transfer_MBps": transfer_rate,
    }


def run_repetitions(kind: str, setup: tuple, repeat: int, size: int, scratch: Path) -> list[dict]:
    rows = []
    for repetition in range(repeat):
        rows.append(measure(kind, setup, repetition, size, scratch))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def summarize(rows: list[dict]) -> dict:
    """Medians per source; the ratios are medians of each repetition's own ratio (the two
    figures of a repetition ran back to back, under the same load)."""
    summary = {}
    for kind in dict.fromkeys(r["source"] for r in rows):
        mine = [r for r in rows if r["source"] == kind]

        def median(key: str, over: str | None = None, mine: list[dict] = mine) -> float:
            values = [r[key] / r[over] if over else r[key] for r in mine]
            return round(statistics.median(values), 2 if over else 1)

        summary[kind] = {
            "curl_MBps": median("curl_MBps"),
            "curl_sync_MBps": median("curl_sync_MBps"),
            "curl_verified_MBps": median("curl_verified_MBps"),
            "kvops_wall_MBps": median("kvops_wall_MBps"),
            "kvops_MBps": median("kvops_MBps"),
            "kvops_transfer_MBps": median("kvops_transfer_MBps"),
            "wall_over_curl": median("kvops_wall_MBps", "curl_MBps"),
            "wall_over_curl_sync": median("kvops_wall_MBps", "curl_sync_MBps"),
            "wall_over_curl_verified": median("kvops_wall_MBps", "curl_verified_MBps"),
            "pull_over_curl": median("kvops_MBps", "curl_MBps"),
            "transfer_over_curl": median("kvops_transfer_MBps", "curl_MBps"),
            "transfer_over_curl_sync": median("kvops_transfer_MBps", "curl_sync_MBps"),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sources", nargs="+", choices=["hf", "s3"], default=["hf", "s3"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kvops-bench-pull-"))
    try:
        folder = write_bench_model(work / "model")
        size = sum((folder / name).stat().st_size for name in KEPT)
        print(f"model: {size / 1e9:.2f} GB in {len(KEPT)} files", flush=True)
        rows = []
        # One source at a time, with only its own server alive on the two CPUs.
        if "hf" in args.sources:
            with HubServer() as hub:
                hub.add_repo("bench/smollm2-360m", folder)
                setup = (
                    "hf://bench/smollm2-360m",
                    {"HF_ENDPOINT": hub.url},
                    {n: f"{hub.url}/bench/smollm2-360m/resolve/main/{n}" for n in KEPT},
                    [],
                )
                rows += run_repetitions("hf", setup, args.repeat, size, work / "scratch")
        if "s3" in args.sources:
            with MinioServer(work / "minio") as s3:
                client = s3.client()
                client.create_bucket(Bucket="models")
                for name in KEPT:  # model.safetensors goes up in parts: its ETag is no MD5
                    client.upload_file(str(folder / name), "models", f"smollm2-360m/{name}")
                setup = (
                    "s3://models/smollm2-360m",
                    s3.env,
                    {n: f"{s3.url}/models/smollm2-360m/{n}" for n in KEPT},
                    ["--aws-sigv4", "aws:amz:us-east-1:s3", "--user", f"{ACCESS_KEY}:{SECRET_KEY}"],
                )
                rows += run_repetitions("s3", setup, args.repeat, size, work / "scratch")
        summary = summarize(rows)
        print(json.dumps(summary, indent=1))
        load = os.getloadavg()
        write_record(
            "model_pull",
            rows,
            summary=json.dumps(summary),
            model=f"SmolLM2-360M shapes, random float32 weights, {size} bytes",
            load_average=f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (at the end)",
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
