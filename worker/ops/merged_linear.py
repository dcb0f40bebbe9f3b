"""One linear layer from several that read the same input (q/k/v, gate/up).

A decode step of a small model is made of many small GEMMs, and each call costs a fixed amount
besides its weight reads (Python, the op dispatch, waking torch's OpenMP workers: tens of
microseconds on a 2-core CPU). Stacking the weights of the projections that share an input
makes one call of them: with SmolLM2 that is 4 linear calls a layer instead of 7. Each output
row is still the dot of the same weight row with the same input, so the C++ quantized kernel
gives the same numbers as before; dense GEMM libraries may block a taller matrix differently
(float32 rounding, not bit for bit).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from kvops.worker.ops.quant_linear import QuantizedLinear, QuantizedTensor

__all__ = ["ConcatLinear", "merge_linears"]


class ConcatLinear(nn.Module):
    """The layers run one by one and their outputs concatenated: the fallback for layers whose
    weights cannot be stacked (different formats or dtypes)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x) for layer in self.layers], dim=-1)


def merge_linears(layers: list[nn.Module]) -> nn.Module:
    """One module computing ``cat([layer(x) for layer in layers], -1)``, with one weight matrix
    when the layers allow it (all ``nn.Linear`` of one dtype, or all ``QuantizedLinear`` of one
    format), a :class:`ConcatLinear` otherwise."""
    biases: list[torch.Tensor | None] = [getattr(layer, "bias", None) for layer in layers]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return ConcatLinear(layers)
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases if b is not None])
    dense = [layer for layer in layers if type(layer) is nn.Linear]
    quantized = [layer for layer in layers if type(layer) is QuantizedLinear]
    if len(dense) == len(layers):
        return _merge_dense(dense, bias) or ConcatLinear(layers)
    if len(quantized) == len(layers):
        return _merge_quantized(quantized, bias) or ConcatLinear(layers)
    return ConcatLinear(layers)


def _merge_dense(layers: list[nn.Linear], bias: torch.Tensor | None) -> nn.Linear | None:
    weights = [layer.weight.detach() for layer in layers]
    if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
        return None
    out_features = sum(w.shape[0] for w in weights)
    # On the meta device: the stacked tensors below replace the parameters it would allocate.
    merged = nn.Linear(weights[0].shape[1], out_features, bias=bias is not None, device="meta")
    merged.weight = nn.Parameter(torch.cat(weights), requires_grad=False)
    if bias is not None:
        merged.bias = nn.Parameter(bias, requires_grad=False)
    return merged


def _merge_quantized(
    layers: list[QuantizedLinear], bias: torch.Tensor | None
) -> QuantizedLinear | None:
    if len({(layer.fmt, layer.in_features, layer.weight.device) for layer in layers}) != 1:
        return None
    fmt = layers[0].fmt
    # The layers' weight and scale are buffers (tensors; typed loosely by nn.Module).
    blocks = [cast(torch.Tensor, layer.weight) for layer in layers]
    scales = [cast(torch.Tensor, layer.scale) for layer in layers]
    weight = QuantizedTensor(
        fmt,
        torch.cat(blocks),
        (sum(layer.out_features for layer in layers), layers[0].in_features),
        torch.cat(scales) if fmt == "int8" else None,
    )
    return QuantizedLinear(weight, bias)
