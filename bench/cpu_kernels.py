"""The CPU fast paths against what they replace, at SmolLM2-135M shapes (float32):

- linear layers: torch's ``F.linear`` (MKL sgemm) against oneDNN with the weight packed once
  (``worker/ops/cpu_linear.py``), for decode-sized and prefill-sized row counts, and the
  quantized-weight kernel (``worker/ops/csrc/quant_linear_cpu.cpp``) in each format;
- decode attention of one step over 30 layers: the torch reference (gather + SDPA) against the
  C++ kernel (``worker/ops/csrc/paged_attention_cpu.cpp``), 32 sequences of 32-800 tokens.

Each layer has its own cache, allocated like the engine's (numpy zeros), so the attention
figures include reading the context from memory rather than from the CPU caches.

    .venv/bin/python bench/cpu_kernels.py      # writes bench/results/cpu_kernels-<date>.json
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kvops.worker.ops import attention, cpu_attention
from kvops.worker.ops.cpu_linear import PackedLinear
from kvops.worker.ops.quant_formats import FORMATS, quantize
from kvops.worker.ops.quant_linear import QuantizedLinear, QuantizedTensor

sys.path.insert(0, str(Path(__file__).parent))
from records import write_record  # noqa: E402

# (name, out_features, in_features) of SmolLM2-135M's projections and its tied LM head.
LINEAR_SHAPES = [
    ("q/o_proj", 576, 576),
    ("k/v_proj", 192, 576),
    ("gate/up_proj", 1536, 576),
    ("down_proj", 576, 1536),
    ("lm_head", 49152, 576),
]
ROWS = [1, 32, 256]
NUM_LAYERS, NUM_KV_HEADS, GROUP, HEAD_DIM, BLOCK_SIZE = 30, 3, 3, 64, 16


def seconds_per_call(fn, repeats: int) -> float:
    fn()  # warm up (oneDNN builds its kernel on the first call)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def linear_rows() -> list[dict]:
    rows = []
    for name, out_features, in_features in LINEAR_SHAPES:
        weight = torch.randn(out_features, in_features) / in_features**0.5
        packed = PackedLinear(weight, None)
        quantized = {}
        for fmt in FORMATS:
            data, scale = quantize(weight, fmt)
            shape = (out_features, in_features)
            quantized[fmt] = QuantizedLinear(QuantizedTensor(fmt, data, shape, scale))
        for m in ROWS:
            x = torch.randn(m, in_features)
            repeats = max(3, int(2e9 / (2 * m * out_features * in_features)))
            flops = 2 * m * out_features * in_features
            dense = seconds_per_call(lambda x=x, w=weight: F.linear(x, w), repeats)
            onednn = seconds_per_call(lambda x=x, p=packed: p(x), repeats)
            rows.append(
                {
                    "kernel": f"linear {name}",
                    "rows": m,
                    "f_linear_us": round(dense * 1e6, 1),
                    "packed_us": round(onednn * 1e6, 1),
                    "f_linear_gflops": round(flops / dense / 1e9),
                    "packed_gflops": round(flops / onednn / 1e9),
                }
            )
            assert cpu_attention.extension_available(), "the C++ kernels did not build"
            for fmt, layer in quantized.items():
                took = seconds_per_call(lambda x=x, layer=layer: layer(x), repeats)
                rows[-1][f"{fmt}_us"] = round(took * 1e6, 1)
            print(rows[-1], flush=True)
    return rows


def zeroed_cache(num_blocks: int) -> torch.Tensor:
    shape = (NUM_KV_HEADS, num_blocks, BLOCK_SIZE, HEAD_DIM)
    cache = torch.from_numpy(np.zeros(int(np.prod(shape)), dtype=np.float32)).view(shape)
    return cache.normal_()


def attention_row() -> dict:
    rng = random.Random(0)
    lens = [rng.randint(32, 800) for _ in range(32)]
    blocks_per_seq = [-(-n // BLOCK_SIZE) for n in lens]
    num_blocks = sum(blocks_per_seq)
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
    tables = torch.zeros(len(lens), max(blocks_per_seq), dtype=torch.int32)
    for row, n in enumerate(blocks_per_seq):
        tables[row, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    query = torch.randn(len(lens), NUM_KV_HEADS * GROUP, HEAD_DIM)
    caches = [(zeroed_cache(num_blocks), zeroed_cache(num_blocks)) for _ in range(NUM_LAYERS)]
    scale = HEAD_DIM**-0.5

    def step(decode) -> None:
        for k_cache, v_cache in caches:
            decode(query, k_cache, v_cache, tables, seq_lens, scale)

    assert cpu_attention.extension_available(), "the C++ kernel did not build"
    reference = seconds_per_call(lambda: step(attention.paged_decode_attention), 10)
    kernel = seconds_per_call(lambda: step(cpu_attention.paged_decode_attention), 10)
    context_bytes = 2 * sum(lens) * NUM_KV_HEADS * HEAD_DIM * 4 * NUM_LAYERS
    row = {
        "kernel": "decode attention, 30 layers",
        "sequences": len(lens),
        "context_tokens": sum(lens),
        "context_mib_per_step": round(context_bytes / 2**20),
        "torch_reference_ms": round(reference * 1e3, 1),
        "cpp_kernel_ms": round(kernel * 1e3, 1),
        "cpp_kernel_gb_per_s": round(context_bytes / kernel / 1e9, 1),
    }
    print(row, flush=True)
    return row


def main() -> None:
    rows = linear_rows() + [attention_row()]
    write_record(
        "cpu_kernels",
        rows,
        shapes="SmolLM2-135M: hidden 576, MLP 1536, vocab 49152, 9 heads / 3 kv heads of 64, "
        "block size 16",
        threads=str(torch.get_num_threads()),
    )


if __name__ == "__main__":
    main()
