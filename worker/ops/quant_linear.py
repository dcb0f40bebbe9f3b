"""Linear and embedding layers that keep their weights quantized (quant_formats.py layouts).

One decoded token reads every weight once, so on a CPU the bytes per weight set the speed of a
single stream: SmolLM2's Q4_1 file is 98 MB, its float32 expansion 540 MB. `QuantizedLinear`
computes on the stored blocks: on the CPU with the C++ kernel (``csrc/quant_linear_cpu.cpp``,
activations rounded to int16 per 256 values), on CUDA with the Triton kernel
(``triton_quant_linear.quant_matmul``). `QuantizedEmbedding` dequantizes only the rows it looks
up, so a tied embedding and language-model head share one quantized matrix.

`build_model` (model.py) swaps these in for the `nn.Linear`/`nn.Embedding` modules whose weights
the loader (weights.py) handed over as `QuantizedTensor`s.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvops.worker.ops.quant_formats import FORMATS, dequantize

# A prompt's rows are many, and for them the CPU expands the weight for one dense GEMM instead
# of the integer dots; a decode's single row always takes the dots. Which rows are a prompt's is
# said by CausalLM.forward (`prompt_rows_from`): the runner orders a step's decodes first.
#
# For the 4-bit formats, where the CPU has AVX512-BF16 (AMD Zen 4, Intel Sapphire Rapids and
# later), every prompt row takes a bfloat16 GEMM, however few: oneDNN's bfloat16 GEMM is 2.6x
# its float32 one there and passes the dots from about 12 rows (3072 x 576 Q4_1, one thread: at
# 32 rows 0.22 ms to expand plus 0.64 against 1.29 ms of dots); Q4_1 perplexity +0.03% over
# float32 (llama.cpp's own: +0.30%). The choice is made per row, not by the step's row count:
# a row's precision must not depend on what it is batched with, or concurrent requests would
# get other answers than each gets alone. oneDNN's bfloat16 GEMM gives each row the same bits
# whatever the row count (checked at 1-700 rows, one and two threads).
# Q8_0 and int8, the formats chosen to stay close to float32, keep float32: with bfloat16, Q8_0's
# greedy output left the reference's at a 0.2-nat margin. Their float32 GEMM pays from
# `torch.ops.kvops.quant_dense_from_rows()` prompt rows, which the C++ build answers for its own
# instructions (256 with AVX512-VNNI, 128 with AVX2); the float32 GEMM and the int16 dots agree
# to about 1e-5 (relative). A matrix whose float32 copy is larger than DENSE_SCRATCH_BYTES never
# expands: it would take fresh pages from the kernel at every call (the 49152 x 576 Q8_0 head:
# 147 ms at 128 rows against 74 ms of dots).
DENSE_SCRATCH_BYTES = 32 << 20
BF16_FORMATS = ("q4_0", "q4_1")

# Where the prompt rows of the step being run begin; None outside a step's forward pass (the
# language-model head, whose rows are one per request, and direct calls): no prompt rows.
_first_prompt_row: ContextVar[int | None] = ContextVar("first_prompt_row", default=None)


@contextmanager
def prompt_rows_from(row: int) -> Iterator[None]:
    """Within this block, rows from `row` on of the quantized layers' inputs are prompt tokens."""
    token = _first_prompt_row.set(row)
    try:
        yield
    finally:
        _first_prompt_row.reset(token)


@functools.cache
def dense_from_rows() -> int:
    """The prompt rows from which the C++ build expands a weight to float32 (asked once: a torch
    op costs microseconds, and a decode step makes hundreds of linear calls)."""
    return torch.ops.kvops.quant_dense_from_rows()


@functools.cache
def bfloat16_gemm(fmt: str) -> bool:
    """Whether prompt rows of format `fmt` take a bfloat16 GEMM on this CPU."""
    cpu_has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return fmt in BF16_FORMATS and cpu_has_bf16 and torch.backends.mkldnn.is_available()


__all__ = [
    "QuantizedEmbedding",
    "QuantizedLinear",
    "QuantizedTensor",
    "kernel_missing",
    "prompt_rows_from",
]


@dataclass
class QuantizedTensor:
    """A weight as stored: block bytes (or int8 values and per-row `scale`) of `shape`."""

    fmt: str
    data: torch.Tensor
    shape: tuple[int, int]  # (out_features, in_features) of the float weight it stands for
    scale: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        scale = 0 if self.scale is None else self.scale.numel() * self.scale.element_size()
        return self.data.numel() * self.data.element_size() + scale


def kernel_missing(device: torch.device) -> str | None:
    """Why quantized weights cannot run on `device` (None: a kernel is there)."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "CUDA needs Triton for quantized weights, and triton is not installed"
        return None
    if device.type == "cpu":
        from kvops.worker.ops.cpu_attention import extension_available

        if not extension_available():
            return "the C++ CPU kernels did not build (is a C++ compiler installed?)"
        return None
    return f"there is no quantized kernel for device type {device.type!r}"


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` a `QuantizedTensor` (inference only)."""

    # Buffers (register_buffer below), declared so that they read as tensors.
    weight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.fmt = weight.fmt
        self.code = FORMATS[weight.fmt].code
        self.out_features, self.in_features = weight.shape
        self.may_expand = self.out_features * self.in_features * 4 <= DENSE_SCRATCH_BYTES
        # Buffers: they follow .to() and count in memory reports, but are not parameters.
        self.register_buffer("weight", weight.data, persistent=False)
        self.register_buffer(
            "scale",
            weight.scale if weight.scale is not None else torch.empty(0, device=weight.data.device),
            persistent=False,
        )
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A decode step makes 121 of these calls on SmolLM2: every tensor op skipped where it
        # would do nothing (a 2-D float32 input on the CPU) is a microsecond or more of a step.
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if x.device.type == "cuda":
            from kvops.worker.ops import triton_quant_linear  # imports Triton: only on CUDA

            scale = self.scale if self.fmt == "int8" else None
            y = triton_quant_linear.quant_matmul(
                rows, self.weight, self.fmt, self.out_features, self.in_features, scale=scale
            )
        else:
            y = self._cpu(rows if rows.dtype == torch.float32 else rows.float())
        if self.bias is not None:
            y = y + self.bias
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _cpu(self, rows: torch.Tensor) -> torch.Tensor:
        """Decode rows through the integer dots, prompt rows through a dense GEMM where it pays."""
        if not rows.is_contiguous():
            rows = rows.contiguous()
        first = _first_prompt_row.get()
        prompt_rows = 0 if first is None else max(rows.shape[0] - first, 0)
        dtype = self._prompt_gemm_dtype(prompt_rows) if prompt_rows else None
        y = torch.empty(rows.shape[0], self.out_features)
        if dtype is None:  # every row through the dots, unsliced (a decode step's every call)
            torch.ops.kvops.quant_linear_cpu(rows, self.weight, self.scale, self.code, y)
            return y
        decodes = rows.shape[0] - prompt_rows
        if decodes:
            torch.ops.kvops.quant_linear_cpu(
                rows[:decodes], self.weight, self.scale, self.code, y[:decodes]
            )
        dense = torch.empty(self.out_features, self.in_features, dtype=dtype)
        torch.ops.kvops.dequantize_cpu(self.weight, self.scale, self.code, dense)
        y[decodes:] = F.linear(rows[decodes:].to(dtype), dense)
        return y

    def _prompt_gemm_dtype(self, prompt_rows: int) -> torch.dtype | None:
        """The dtype of the dense GEMM for this many prompt rows (None: the dots take them)."""
        if not self.may_expand:
            return None
        if bfloat16_gemm(self.fmt):
            return torch.bfloat16
        return torch.float32 if prompt_rows >= dense_from_rows() else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt}"


class QuantizedEmbedding(nn.Module):
    """Token embeddings from a quantized matrix: only the looked-up rows are dequantized."""

    weight: torch.Tensor
    scale: torch.Tensor | None

    def __init__(self, weight: QuantizedTensor, dtype: torch.dtype):
        super().__init__()
        self.fmt = weight.fmt
        self.num_embeddings, self.embedding_dim = weight.shape
        self.dtype = dtype
        self.register_buffer("weight", weight.data, persistent=False)
        self.register_buffer("scale", weight.scale, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        scale = None if self.scale is None else self.scale[flat]
        rows = dequantize(self.weight[flat], self.fmt, self.embedding_dim, scale)
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.fmt}"
