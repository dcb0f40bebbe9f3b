"""The quantized weight formats the engine computes on, and their pure-torch reference.

A block-quantized weight is a ``torch.uint8`` tensor ``[out_features, in_features // 32 *
block_bytes]``: each row is its GGUF blocks exactly as llama.cpp stores them, 32 weights a block:

- Q8_0 (34 bytes): fp16 scale ``d``, 32 int8 ``q``; ``w = d * q``.
- Q4_0 (18 bytes): fp16 ``d``, 16 bytes of nibbles; ``w = d * (q - 8)``.
- Q4_1 (20 bytes): fp16 ``d``, fp16 minimum ``m``, 16 bytes of nibbles; ``w = d * q + m``.

In the nibble formats weight ``j < 16`` of a block is the low nibble of byte ``j`` and weight
``j + 16`` its high nibble. INT8 weight-only is per output channel: an ``int8 [out, in]`` tensor
and a ``float32 [out]`` scale, ``w = scale[row] * q``.

The CPU kernel (``csrc/quant_linear_cpu.cpp``) and the Triton kernel
(``triton_quant_linear.py``) both take these layouts; the functions here are the reference they
are tested against, and the quantizers turn float weights into these formats at load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "BLOCK",
    "FORMATS",
    "GGML_TYPE_FORMATS",
    "QuantFormat",
    "dequantize",
    "dequantize_blocks",
    "quantize",
]

BLOCK = 32  # weights per block, and the granularity the kernels quantize activations at


@dataclass(frozen=True)
class QuantFormat:
    name: str  # as `--quantization` spells it
    code: int  # the C++ kernel's format code
    block_bytes: int  # bytes per 32 weights in a row
    ggml_type: int | None  # the GGUF tensor type holding it (None: not a GGUF format)

    def row_bytes(self, in_features: int) -> int:
        return in_features // BLOCK * self.block_bytes


FORMATS = {
    f.name: f
    for f in (
        QuantFormat("q8_0", 0, 34, 8),
        QuantFormat("q4_0", 1, 18, 2),
        QuantFormat("q4_1", 2, 20, 3),
        QuantFormat("int8", 3, BLOCK, None),
    )
}
GGML_TYPE_FORMATS = {f.ggml_type: f for f in FORMATS.values() if f.ggml_type is not None}


def _fp16_field(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """[..., n_blocks, block_bytes] uint8 -> [..., n_blocks, 1] float32 of the fp16 at `start`."""
    return blocks[..., start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.cat((packed & 0x0F, packed >> 4), dim=-1).float()


def dequantize_blocks(blocks: torch.Tensor, fmt: str, in_features: int) -> torch.Tensor:
    """GGUF blocks ``[rows, row_bytes]`` uint8 -> float32 ``[rows, in_features]``."""
    spec = FORMATS[fmt]
    if spec.ggml_type is None:
        raise ValueError(f"{fmt} is not a block format")
    rows = blocks.shape[0]
    b = blocks.reshape(rows, in_features // BLOCK, spec.block_bytes)
    d = _fp16_field(b, 0)
    if fmt == "q8_0":
        values = b[..., 2:].contiguous().view(torch.int8).float() * d
    elif fmt == "q4_0":
        values = (_nibbles(b[..., 2:]) - 8.0) * d
    else:
        values = _nibbles(b[..., 4:]) * d + _fp16_field(b, 2)
    return values.reshape(rows, in_features)


def dequantize(
    weight: torch.Tensor, fmt: str, in_features: int, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Any format's weight as float32 ``[rows, in_features]`` (int8 needs its `scale`)."""
    if fmt == "int8":
        if scale is None:
            raise ValueError("int8 weights need their per-row scale")
        return weight.float() * scale[:, None]
    return dequantize_blocks(weight, fmt, in_features)


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """[..., 1] float -> [..., 2] uint8 (the fp16's little-endian bytes)."""
    return values.to(torch.float16).view(torch.uint8)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[..., 32] values 0..15 -> [..., 16] uint8 (j in the low nibble, j + 16 in the high)."""
    q = q.to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def quantize(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float weights ``[rows, in]`` -> (quantized weight, int8's per-row scale or None).

    The block formats round as llama.cpp's reference quantizers do (Q8_0: ``d = amax / 127``;
    Q4_0: ``d = -max / 8`` with max the value of largest magnitude; Q4_1: ``d = (max - min) /
    15``, ``m = min``). INT8: symmetric per row, ``scale = amax / 127``.
    """
    w = weight.detach().float()
    rows, in_features = w.shape
    if in_features % BLOCK:
        raise ValueError(f"{fmt} needs rows of a multiple of {BLOCK} values, got {in_features}")
    if fmt == "int8":
        scale = w.abs().amax(dim=1) / 127.0
        inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        q = torch.round(w * inverse[:, None]).clamp(-127, 127).to(torch.int8)
        return q.contiguous(), scale.contiguous()
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization {fmt!r}; known: {', '.join(FORMATS)}")
    x = w.reshape(rows, in_features // BLOCK, BLOCK)

    def inverse_of(d: torch.Tensor) -> torch.Tensor:
        return torch.where(d != 0, 1.0 / d, torch.zeros_like(d))

    if fmt == "q8_0":
        d = x.abs().amax(dim=-1, keepdim=True) / 127.0
        q = torch.round(x * inverse_of(d)).clamp(-127, 127).to(torch.int8).view(torch.uint8)
        parts = [_fp16_bytes(d), q]
    elif fmt == "q4_0":
        index = x.abs().argmax(dim=-1, keepdim=True)
        d = x.gather(-1, index) / -8.0
        q = torch.floor(x * inverse_of(d) + 8.5).clamp(0, 15)
        parts = [_fp16_bytes(d), _pack_nibbles(q)]
    else:
        low = x.amin(dim=-1, keepdim=True)
        d = (x.amax(dim=-1, keepdim=True) - low) / 15.0
        q = torch.floor((x - low) * inverse_of(d) + 0.5).clamp(0, 15)
        parts = [_fp16_bytes(d), _fp16_bytes(low), _pack_nibbles(q)]
    return torch.cat(parts, dim=-1).reshape(rows, -1).contiguous(), None
