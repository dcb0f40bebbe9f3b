"""Weight-only quantized matmul on a GPU: the Triton kernels (worker/ops/triton_quant_linear.py)
against torch's bfloat16 matmul (cuBLAS) of the same shape, at decode sizes.

For each weight shape of a Llama-3-8B layer (and SmolLM2-135M's gate projection), each format and
each row count M, it times `quant_matmul` (the kernel, the split-K reduction and the cast, as a
layer pays them) and `x @ W.T` with W in bfloat16, with triton.testing.do_bench (median of its
repetitions), and reports the weight bytes read per microsecond (GB/s) against the device's copy
bandwidth. Every configuration's output is first checked against the dequantize-then-matmul
reference, so a fast wrong kernel is reported as wrong.

`--sweep` also tries the tile sizes, the split-K target and the warp count on the Q4_1 shapes at
M = 1 and 16 and prints the fastest, so that the defaults can be chosen from a measurement.

    python bench/triton_quant_matmul.py --sweep --out results.json   (needs a CUDA GPU)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from test_triton_quant_linear import random_blocks, reference_dequantize  # noqa: E402

from kvops.worker.ops import triton_quant_linear as tq  # noqa: E402

SHAPES = {  # name: (out_features N, in_features K)
    "llama3-8b q/o_proj": (4096, 4096),
    "llama3-8b gate/up_proj": (14336, 4096),
    "llama3-8b down_proj": (4096, 14336),
    "smollm2-135m gate_proj": (1536, 576),
}
ROWS = [1, 4, 16, 64]
FORMATS = ["q4_1", "q4_0", "q8_0", "int8"]


def weight_bytes(fmt: str, n: int, k: int) -> int:
    if fmt == "int8":
        return n * k + 4 * n
    return n * k // 32 * tq.BLOCK_BYTES[fmt]


def make_weight(fmt: str, n: int, k: int, gen: torch.Generator):
    """(blocks or int8 weight, scale or None, the float32 weight they encode), on the GPU."""
    if fmt == "int8":
        weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        scale = torch.rand(n, generator=gen) * 0.01
        return weight.cuda(), scale.cuda(), (weight.float() * scale[:, None]).cuda()
    blocks = random_blocks(fmt, n, k, gen)
    return blocks.cuda(), None, reference_dequantize(blocks, fmt, k).cuda()


def check(got: torch.Tensor, x: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest error relative to the reference's scale (bfloat16 activations)."""
    expected = x.float() @ reference.T
    return float((got.float() - expected).abs().max() / expected.abs().max())


def time_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1000


def measure(fmt: str, quantized: tuple, m: int, gen: torch.Generator, dense: torch.Tensor) -> dict:
    weight, scale, reference = quantized
    n, k = reference.shape
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()

    def run():
        return tq.quant_matmul(x, weight, fmt, n, k, scale=scale)

    error = check(run(), x, reference)
    kernel_us = time_us(run)
    dense_us = time_us(lambda: x @ dense.T)
    size = weight_bytes(fmt, n, k)
    return {
        "format": fmt,
        "N": n,
        "K": k,
        "M": m,
        "weight_MB": round(size / 1e6, 2),
        "triton_us": round(kernel_us, 2),
        "triton_GBps": round(size / kernel_us / 1e3, 1),
        "bf16_cublas_us": round(dense_us, 2),
        "speedup_vs_bf16": round(dense_us / kernel_us, 2),
        "max_rel_error": round(error, 5),
    }


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy, counting bytes read and written (the ceiling)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = time_us(lambda: b.copy_(a))
    return round(2 * a.numel() / us / 1e3, 1)


def time_q4_1(x: torch.Tensor, weight: torch.Tensor, n: int, k: int) -> float:
    return time_us(lambda: tq.quant_matmul(x, weight, "q4_1", n, k))


def sweep(gen: torch.Generator) -> dict:
    """The fastest (BLOCK_N, BLOCK_K, TARGET_PROGRAMS, num_warps) per Q4_1 shape at M = 1, 16,
    and the one configuration with the least total time over all of them."""
    defaults = (tq._BLOCK_N, tq._BLOCK_K, tq.TARGET_PROGRAMS, tq.NUM_WARPS)
    best = []
    totals: dict[tuple, float] = {}
    try:
        for (name, (n, k)), m in itertools.product(list(SHAPES.items())[:3], [1, 16]):
            weight, _, reference = make_weight("q4_1", n, k, gen)
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
            tried = []
            for config in itertools.product([32, 64, 128], [64, 128, 256], [132, 264, 528], [4, 8]):
                tq._BLOCK_N, tq._BLOCK_K, tq.TARGET_PROGRAMS, tq.NUM_WARPS = config
                out = tq.quant_matmul(x, weight, "q4_1", n, k)
                if check(out, x, reference) > 0.02:
                    tried.append((float("inf"), config))
                    continue
                tried.append((time_q4_1(x, weight, n, k), config))
            for us, config in tried:
                totals[config] = totals.get(config, 0.0) + us
            tried.sort()
            tq._BLOCK_N, tq._BLOCK_K, tq.TARGET_PROGRAMS, tq.NUM_WARPS = defaults
            default_us = time_q4_1(x, weight, n, k)
            row = {
                "shape": name,
                "M": m,
                "default_us": round(default_us, 2),
                "best_us": round(tried[0][0], 2),
                "best": dict(
                    zip(
                        ["BLOCK_N", "BLOCK_K", "TARGET_PROGRAMS", "num_warps"],
                        tried[0][1],
                        strict=True,
                    )
                ),  # fmt: skip
                "next": [[round(t, 2), list(c)] for t, c in tried[1:4]],
            }
            print(json.dumps(row), flush=True)
            best.append(row)
    finally:
        tq._BLOCK_N, tq._BLOCK_K, tq.TARGET_PROGRAMS, tq.NUM_WARPS = defaults
    overall = sorted((us, list(config)) for config, us in totals.items())[:5]
    print(json.dumps({"least_total_us": overall}), flush=True)
    return {"per_shape": best, "least_total_us": overall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/triton_quant_matmul.py needs a CUDA GPU")
    gen = torch.Generator().manual_seed(0)
    started = time.monotonic()
    record = {
        "benchmark": "triton_quant_matmul",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_GBps": copy_bandwidth(),
        "rows": [],
    }
    print(f"{record['device']}, copy {record['copy_GBps']} GB/s", flush=True)
    for name, (n, k) in SHAPES.items():
        dense = torch.randn(n, k, generator=gen).to(torch.bfloat16).cuda()
        for fmt, m in itertools.product(FORMATS, ROWS):
            if m == ROWS[0]:
                quantized = make_weight(fmt, n, k, gen)
            row = {"shape": name, **measure(fmt, quantized, m, gen, dense)}
            print(json.dumps(row), flush=True)
            record["rows"].append(row)
    if args.sweep:
        record["sweep"] = sweep(gen)
    record["seconds"] = round(time.monotonic() - started, 1)
    if args.out:
        args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
