"""Linear layers with their weights pre-packed for oneDNN, for float32 on the CPU.

torch's ``F.linear`` on the CPU calls MKL's sgemm, which on this project's AMD machines runs the
decode-sized GEMMs of a small model (M = 1..64 rows, K = 576..1536) at 60-120 GFLOPS. oneDNN with
the weight reordered once into its blocked layout runs the same shapes 1.5-2.6x faster (measured
with SmolLM2-135M shapes, 2 AVX2 cores: the 49152-row language-model head at M=32 took 26 ms with
F.linear and 10 ms packed; an MLP projection 499 against 286 us). The results agree with
F.linear to float32 rounding (a few 1e-6 on these shapes), not bit for bit.

The packed weight is an opaque ``torch._mkldnn`` tensor; the model keeps its ordinary parameters
(the tied embedding still needs its dense matrix) and :func:`pack_linear_layers` swaps the
``nn.Linear`` modules for :class:`PackedLinear` views of them after the weights are loaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch
from torch import nn

__all__ = ["PackedLinear", "pack_linear_layers", "packing_available"]


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN packing applies: float32 on the CPU, with torch built with oneDNN."""
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` reordered once for oneDNN (inference only)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # Plain attributes, not parameters: the packed tensor has no storage that state_dict,
        # .to() or parameter counting could use.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.bias = None if bias is None else bias.detach()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def pack_linear_layers(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` in ``model`` by a :class:`PackedLinear`; return how many."""
    # Parents and names only: a reference to an old nn.Linear would keep its dense matrix alive.
    targets = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    for parent, name in targets:
        setattr(parent, name, PackedLinear.from_linear(getattr(parent, name)))
    _return_freed_heap()
    return len(targets)


def _return_freed_heap() -> None:
    """Hand the freed dense matrices back to the OS.

    glibc keeps freed heap memory mapped, so without this the process (and a pod's memory
    accounting) kept the whole dense checkpoint after packing: SmolLM2 at 1745 MiB RSS after
    load against 1339 MiB trimmed. Other C libraries have no malloc_trim: nothing to do there.
    """
    name = ctypes.util.find_library("c")
    try:
        malloc_trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return
    malloc_trim(0)
