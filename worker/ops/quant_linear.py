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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvops.worker.ops.quant_formats import FORMATS, dequantize

# With many activation rows (prefill) the CPU expands the weight to float32 for one dense GEMM
# instead of the integer dots: from `torch.ops.kvops.quant_dense_from_rows()` rows, which the
# C++ build answers for its own instructions (256 with AVX512-VNNI, 128 with AVX2). A matrix
# whose float32 copy is larger than DENSE_SCRATCH_BYTES never expands: it would take fresh pages
# from the kernel at every call (the 49152 x 576 Q8_0 head: 147 ms at 128 rows against 74 ms
# of dots).
DENSE_SCRATCH_BYTES = 32 << 20


@functools.cache
def dense_from_rows() -> int:
    """The rows from which the C++ build expands a weight (asked once: a torch op costs
    microseconds, and a decode step makes hundreds of linear calls)."""
    return torch.ops.kvops.quant_dense_from_rows()


__all__ = [
    "QuantizedEmbedding",
    "QuantizedLinear",
    "QuantizedTensor",
    "kernel_missing",
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
        rows = x.reshape(-1, self.in_features)
        if x.device.type == "cuda":
            from kvops.worker.ops import triton_quant_linear  # imports Triton: only on CUDA

            scale = self.scale if self.fmt == "int8" else None
            y = triton_quant_linear.quant_matmul(
                rows, self.weight, self.fmt, self.out_features, self.in_features, scale=scale
            )
        elif self.may_expand and rows.shape[0] >= dense_from_rows():
            dense = torch.empty(self.out_features, self.in_features)
            torch.ops.kvops.dequantize_cpu(self.weight, self.scale, self.code, dense)
            y = F.linear(rows.float(), dense)
        else:
            y = torch.empty(rows.shape[0], self.out_features)
            torch.ops.kvops.quant_linear_cpu(
                rows.float().contiguous(), self.weight, self.scale, self.code, y
            )
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

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
