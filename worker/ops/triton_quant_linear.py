"""Weight-only quantized matmul in Triton: GGUF Q8_0 / Q4_0 / Q4_1 blocks and int8 per-channel.

``quant_matmul(x, blocks, fmt, out_features, in_features)`` computes ``x @ W.T`` where W is kept
as the GGUF file's raw blocks: a uint8 tensor [out_features, in_features // 32 * block_bytes],
each row the blocks of one output feature in order along the input dimension. The blocks are
dequantized in registers, one [BLOCK_K, BLOCK_N] tile at a time, and never written out; products
accumulate in float32 and the result has x's dtype. ``int8_matmul(x, weight, scale)`` does the
same for an int8 [out, in] weight with a float32 scale per output row (applied once, after the
dot, since it does not vary along K).

Block formats (32 weights per block, fp16 fields little-endian at the block's start):

* Q8_0, 34 bytes: d, then 32 int8 q; w = d * q.
* Q4_0, 18 bytes: d, then 16 bytes; weight j < 16 is the low nibble of byte j, weight j + 16 its
  high nibble; w = d * (q - 8).
* Q4_1, 20 bytes: d, m, then 16 bytes of nibbles as Q4_0; w = d * q + m.

Every block size is even, so a row's fp16 fields sit at even byte offsets: the wrapper passes the
same storage twice, once as int8/uint8 (the quants) and once viewed as float16 (the scales),
rather than assembling fp16 values from byte pairs in the kernel.

As with ``triton_attention``, on a machine without a GPU these kernels run on CPU tensors under
Triton's interpreter, which must be enabled (``TRITON_INTERPRET=1``) before this module is
imported.

Tiling, chosen for decode (M = 1-64 rows); checked on an H200 and tuned there by a sweep (see
the constants below):

* One program per (row tile, column tile, K split). tl.dot needs at least 16 rows, so a decode
  step of one token wastes 15/16 of the MMA; the step is bound by the weight reads, not the
  MMA, so that is the cheap place to waste.
* Decode-sized outputs (576 columns in SmolLM2-135M) give few column tiles, far fewer than an
  H100/H200 has SMs, so K is split over programs (``split_k``) until there are about
  ``TARGET_PROGRAMS`` of them; the float32 partial sums are added by one torch reduction.
* The scale of each block is gathered per element of the tile (32 equal addresses along K);
  they hit the L1 cache. Loading one scale per block and broadcasting would save issue slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["BLOCK_BYTES", "INTERPRETED", "int8_matmul", "quant_matmul"]

QK = 32  # weights per GGUF block
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}
_FORMAT_IDS = {"q8_0": 0, "q4_0": 1, "q4_1": 2}
# Measured on an H200 (bench/triton_quant_matmul.py --sweep, bench/results/README.md): over
# Llama-3-8B's projections at M = 1 and 16, 128 x 64 tiles with 8 warps and about twice the SM
# count (132) of programs were the fastest or within 5% of it; the first guess (64 x 128, 4
# warps, 256 programs) was 1.1-2.8x slower.
TARGET_PROGRAMS = 264
_BLOCK_N = 128
_BLOCK_K = 64  # a multiple of QK, so a K tile holds whole blocks
NUM_WARPS = 8


@triton.jit
def _dequantized_tile(
    q_ptr,
    h_ptr,
    row_bytes,
    offs_k,
    offs_n,
    mask,
    FMT: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
):
    # The weights W[n, k] for k in offs_k ([BLOCK_K, 1]) and n in offs_n ([1, BLOCK_N]), float32.
    block = offs_k // 32
    j = offs_k % 32
    row = offs_n.to(tl.int64) * row_bytes
    # fp16 fields are addressed in halves: a block is BLOCK_BYTES // 2 halves long.
    half = row // 2 + block * (BLOCK_BYTES // 2)
    d = tl.load(h_ptr + half, mask=mask, other=0.0).to(tl.float32)
    if FMT == 0:  # q8_0
        q = tl.load(q_ptr + row + block * BLOCK_BYTES + 2 + j, mask=mask, other=0)
        w = d * q.to(tl.float32)
    else:
        data = 2 if FMT == 1 else 4
        byte = tl.load(q_ptr + row + block * BLOCK_BYTES + data + j % 16, mask=mask, other=0)
        q = ((byte.to(tl.int32) >> ((j // 16) * 4)) & 0xF).to(tl.float32)
        if FMT == 1:  # q4_0
            w = d * (q - 8.0)
        else:  # q4_1
            m = tl.load(h_ptr + half + 1, mask=mask, other=0.0).to(tl.float32)
            w = d * q + m
    return w


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # A constexpr if-block is resolved at compile time (kept over a ternary for clarity).
    if IEEE:  # noqa: SIM108 (float32 activations: full precision, as the reference computes)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _tile(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # This program's output rows and columns, and which K split it sums.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, tl.program_id(2)


@triton.jit
def _x_tile(x_ptr, offs_m, offs_k, M, K, stride_xm, UPCAST: tl.constexpr):
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    if UPCAST:
        # The interpreter keeps bfloat16 as raw integers and tl.dot on them is wrong (see
        # triton_attention._dot); compute in float32 there. Compiled kernels never upcast.
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_partial(out_ptr, acc, split, offs_m, offs_n, M, N):
    out = out_ptr + split * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _quant_matmul_kernel(
    x_ptr,
    q_ptr,  # the blocks as bytes (int8 for Q8_0's quants, uint8 for nibbles)
    h_ptr,  # the same blocks viewed as float16
    out_ptr,  # [SPLIT_K, M, N] float32 partial sums
    M,
    N,
    K,
    stride_xm,
    row_bytes,
    k_per_split,  # a multiple of BLOCK_K
    FMT: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    offs_m, offs_n, split = _tile(BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _x_tile(x_ptr, offs_m, offs_k, M, K, stride_xm, UPCAST)
        w_mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        w = _dequantized_tile(
            q_ptr, h_ptr, row_bytes, offs_k[:, None], offs_n[None, :], w_mask, FMT, BLOCK_BYTES
        )
        acc = _dot(x, w.to(x.dtype), acc, IEEE)
    _store_partial(out_ptr, acc, split, offs_m, offs_n, M, N)


@triton.jit
def _int8_matmul_kernel(
    x_ptr,
    w_ptr,  # int8 [N, K]
    scale_ptr,  # float32 [N]
    out_ptr,  # [SPLIT_K, M, N] float32 partial sums
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    k_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    offs_m, offs_n, split = _tile(BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _x_tile(x_ptr, offs_m, offs_k, M, K, stride_xm, UPCAST)
        w_mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        w_addr = offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        w = tl.load(w_ptr + w_addr, mask=w_mask, other=0)
        # int8 values are exact in bfloat16/float16: the scale is applied to the sum instead.
        acc = _dot(x, w.to(x.dtype), acc, IEEE)
    scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    _store_partial(out_ptr, acc * scale[None, :], split, offs_m, offs_n, M, N)


INTERPRETED = type(_quant_matmul_kernel).__name__ == "InterpretedFunction"


def _block_m(m: int) -> int:
    return min(max(triton.next_power_of_2(m), 16), 64)


def _split_k(m: int, n: int, k: int, block_m: int) -> int:
    """How many programs share one output tile's K range: enough for about TARGET_PROGRAMS."""
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, _BLOCK_N)
    k_tiles = triton.cdiv(k, _BLOCK_K)
    return max(1, min(k_tiles, TARGET_PROGRAMS // tiles))


def _check_x(x: torch.Tensor, in_features: int) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"x must be [M, {in_features}], got {list(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    return x if x.stride(1) == 1 else x.contiguous()


def _launch_split(kernel, x: torch.Tensor, n: int, k: int, split_k: int | None, **args):
    """Run `kernel` over (row tiles, column tiles, K splits); sum the splits into x's dtype."""
    m = x.shape[0]
    block_m = _block_m(m)
    splits = split_k if split_k is not None else _split_k(m, n, k, block_m)
    k_tiles = triton.cdiv(k, _BLOCK_K)
    k_per_split = triton.cdiv(k_tiles, splits) * _BLOCK_K
    splits = triton.cdiv(k, k_per_split)  # no empty splits
    partial = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, _BLOCK_N), splits)
    kernel[grid](
        x,
        out_ptr=partial,
        M=m,
        N=n,
        K=k,
        stride_xm=x.stride(0),
        k_per_split=k_per_split,
        BLOCK_M=block_m,
        BLOCK_N=_BLOCK_N,
        BLOCK_K=_BLOCK_K,
        IEEE=x.dtype == torch.float32,
        UPCAST=INTERPRETED and x.dtype == torch.bfloat16,
        num_warps=NUM_WARPS,
        **args,
    )
    out = partial[0] if splits == 1 else partial.sum(dim=0)
    return out.to(x.dtype)


def quant_matmul(
    x: torch.Tensor,
    blocks: torch.Tensor,
    fmt: str,
    out_features: int,
    in_features: int,
    scale: torch.Tensor | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """x [M, in_features] @ W.T with W given as GGUF blocks (see the module docstring), or,
    for ``fmt="int8"``, as an int8 [out, in] weight with its per-row ``scale`` (int8_matmul).

    ``split_k`` overrides the number of programs that share one output tile's K range (tests
    use it to cover both paths); the default picks it from the shape.
    """
    if fmt == "int8":
        if scale is None:
            raise ValueError("int8 weights need their per-row scale")
        if list(blocks.shape) != [out_features, in_features]:
            raise ValueError(
                f"int8 weight must be [{out_features}, {in_features}], got {list(blocks.shape)}"
            )
        return int8_matmul(x, blocks, scale, split_k)
    if fmt not in BLOCK_BYTES:
        formats = [*sorted(BLOCK_BYTES), "int8"]
        raise ValueError(f"quantization format {fmt!r} is not one of {formats}")
    block_bytes = BLOCK_BYTES[fmt]
    if in_features % QK:
        raise ValueError(f"{fmt}: in_features {in_features} is not a multiple of {QK}")
    expected = [out_features, in_features // QK * block_bytes]
    if blocks.dtype != torch.uint8 or list(blocks.shape) != expected:
        raise ValueError(
            f"{fmt} blocks must be uint8 {expected}, got {blocks.dtype} {list(blocks.shape)}"
        )
    if not blocks.is_contiguous() or blocks.data_ptr() % 2:
        # The fp16 view below needs whole rows in order and an even start address.
        raise ValueError(f"{fmt} blocks must be contiguous and 2-byte aligned")
    if blocks.device != x.device:
        raise ValueError(f"x is on {x.device} but the {fmt} blocks are on {blocks.device}")
    x = _check_x(x, in_features)
    quants = blocks.view(torch.int8) if fmt == "q8_0" else blocks
    return _launch_split(
        _quant_matmul_kernel,
        x,
        out_features,
        in_features,
        split_k,
        q_ptr=quants,
        h_ptr=blocks.view(torch.float16),
        row_bytes=expected[1],
        FMT=_FORMAT_IDS[fmt],
        BLOCK_BYTES=block_bytes,
    )


def int8_matmul(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, split_k: int | None = None
) -> torch.Tensor:
    """x [M, in] @ (scale[:, None] * weight).T for an int8 weight [out, in], float32 scale [out]."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-d int8 tensor, got {weight.dtype} {weight.dim()}-d")
    n, k = weight.shape
    if scale.dtype != torch.float32 or list(scale.shape) != [n]:
        raise ValueError(f"scale must be float32 [{n}], got {scale.dtype} {list(scale.shape)}")
    if weight.stride(1) != 1:
        raise ValueError("weight rows must be contiguous")
    if weight.device != x.device or scale.device != x.device:
        raise ValueError(f"x, weight and scale must share a device: {x.device}, {weight.device}")
    x = _check_x(x, k)
    return _launch_split(
        _int8_matmul_kernel,
        x,
        n,
        k,
        split_k,
        w_ptr=weight,
        scale_ptr=scale.contiguous(),
        stride_wn=weight.stride(0),
    )
