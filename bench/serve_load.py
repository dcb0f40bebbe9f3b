"""Serving load: a closed-loop async load generator against a real `kvops serve`, over the
OpenAI-compatible HTTP API (streaming completions) and over gRPC (Generate).

The workload is the engine benchmark's (bench/engine_throughput.py): fixed-seed prompts of
32-512 random tokens, 16-256 output tokens, EOS ignored. At each concurrency C, C clients each
send their next request as soon as the previous one finished. Reported: requests/s, output
tokens/s, time to first token and time per output token (p50/p99), as a client sees them.

    .venv/bin/python bench/serve_load.py                       # HTTP and gRPC at C = 1 8 32 64
    .venv/bin/python bench/serve_load.py --concurrency 8 --protocols http
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import grpc
import httpx

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from engine_throughput import workload  # noqa: E402
from records import write_record  # noqa: E402
from serve_process import ServeProcess  # noqa: E402

from kvops.v1 import engine_pb2, engine_pb2_grpc  # noqa: E402

VOCAB = 49152  # SmolLM2's


class Timing:
    """One request as its client saw it."""

    def __init__(self, started: float):
        self.started = started
        self.first_token: float | None = None
        self.finished = 0.0
        self.tokens = 0

    @property
    def ttft(self) -> float:
        return (self.first_token or self.finished) - self.started

    @property
    def tpot(self) -> float | None:
        if self.tokens < 2 or self.first_token is None:
            return None
        return (self.finished - self.first_token) / (self.tokens - 1)


async def http_request(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> Timing:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    timing = Timing(time.perf_counter())
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and timing.first_token is None:
                timing.first_token = time.perf_counter()
            if chunk.get("usage"):
                timing.tokens = chunk["usage"]["completion_tokens"]
    timing.finished = time.perf_counter()
    return timing


async def grpc_request(stub, prompt: list[int], max_tokens: int) -> Timing:
    request = engine_pb2.GenerateRequest(
        prompt_token_ids=engine_pb2.TokenIds(ids=prompt),
        sampling=engine_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )
    timing = Timing(time.perf_counter())
    async for response in stub.Generate(request):
        if response.token_ids and timing.first_token is None:
            timing.first_token = time.perf_counter()
        timing.tokens += len(response.token_ids)
    timing.finished = time.perf_counter()
    return timing


async def closed_loop(send, requests, concurrency: int) -> tuple[float, list[Timing]]:
    queue = list(requests)
    timings: list[Timing] = []

    async def client() -> None:
        while queue:
            prompt, max_tokens = queue.pop(0)
            timings.append(await send(prompt, max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - start, timings


async def run(protocol: str, server: ServeProcess, requests, concurrency: int) -> dict:
    if protocol == "http":
        limits = httpx.Limits(max_connections=concurrency + 4)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=3600, limits=limits) as c:
            elapsed, timings = await closed_loop(
                lambda p, n: http_request(c, p, n), requests, concurrency
            )
    else:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = engine_pb2_grpc.EngineStub(channel)
            elapsed, timings = await closed_loop(
                lambda p, n: grpc_request(stub, p, n), requests, concurrency
            )
    tokens = sum(t.tokens for t in timings)
    ttft = [t.ttft for t in timings]
    tpot = [t.tpot for t in timings if t.tpot is not None]
    return {
        "protocol": protocol,
        "concurrency": concurrency,
        "requests": len(timings),
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(timings) / elapsed, 3),
        "output_tokens_per_s": round(tokens / elapsed, 1),
        "ttft_p50_s": round(percentile(ttft, 50), 3),
        "ttft_p99_s": round(percentile(ttft, 99), 3),
        "tpot_p50_s": round(percentile(tpot, 50), 4),
        "tpot_p99_s": round(percentile(tpot, 99), 4),
    }


def percentile(values: list[float], p: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--protocols", nargs="+", default=["http", "grpc"])
    parser.add_argument("--requests-per-slot", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=8)
    args = parser.parse_args()

    rows = []
    max_seqs = str(max(args.concurrency))
    with ServeProcess("--max-num-seqs", max_seqs) as server:
        for concurrency in args.concurrency:
            count = max(args.min_requests, args.requests_per_slot * concurrency)
            for index, protocol in enumerate(args.protocols):
                # Fresh prompts per run: repeats would be served from the prefix cache.
                requests = workload(count, VOCAB, seed=1000 * index + concurrency)
                row = asyncio.run(run(protocol, server, requests, concurrency))
                print(json.dumps(row), flush=True)
                rows.append(row)

    write_record("serve_load", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
