"""Paged attention in Triton: KV-cache write, paged decode and paged (chunked) prefill.

Same functions, signatures and semantics as the torch reference in ``attention.py`` (read its
docstring for the cache layout). Import this module only when Triton is wanted; on a machine
without a GPU the kernels run on CPU tensors under Triton's interpreter, which must be enabled
(``TRITON_INTERPRET=1``) *before* this module is imported, because ``@triton.jit`` decides at
decoration time whether a kernel is compiled or interpreted.

Shape assumptions:

* ``head_dim`` may be anything >= 16 (64 and 128 are the ones that matter); tiles are padded to
  the next power of two and masked, so non-powers of two cost a little wasted work only.
* ``block_size`` (tokens per cache block) may be any positive integer. Key tiles (``BLOCK_N``
  tokens) are independent of it: every key position looks up its own block in the block table,
  so one tile may span several cache blocks or part of one.
* The last dimension of every tensor must be contiguous; other strides are passed to the kernels
  (the query may be a view into a fused QKV projection).

Performance notes (to be tuned on an H100):

* All dot products go through ``tl.dot`` (tensor cores). For float32 inputs they use IEEE
  precision, not TF32, so float32 models match the reference closely; TF32 would be faster.
* Decode runs one program per (sequence, kv head) and puts the group's query heads in the rows
  of the dot (padded to 16), so every K/V tile is read once per kv head. Long contexts with few
  sequences would want a split-K ("flash decoding") variant that splits the context over several
  programs and reduces their partial softmaxes.
* Prefill runs one program per (sequence, query tile, query head): K/V tiles are read once per
  query head (served from L2 for the other heads of the group). Packing the group into the rows
  and splitting the key loop into an unmasked part and a diagonal part are the next steps.
* Block ids are widened to int64 before the multiplication by the block stride so that caches
  over 2**31 elements address correctly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRETED",
    "paged_decode_attention",
    "paged_prefill_attention",
    "write_kv_cache",
]

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # Triton 3.9's interpreter keeps bfloat16 tensors as raw uint16 and hands them to np.matmul
    # as integers, so a bfloat16 tl.dot returns garbage there; UPCAST (set only when
    # interpreting bfloat16) converts the operands to float32 first. Compiled kernels never
    # upcast: bfloat16/float16 dots run on tensor cores with float32 accumulation.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    # A constexpr if-block is resolved at compile time (kept over a ternary for clarity).
    if IEEE or UPCAST:  # noqa: SIM108
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # One key tile of the online softmax, in base 2: `s` holds the tile's scaled scores (hidden
    # keys at -inf) and `v` its values. Returns the new running maximum, denominator and output.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    NUM_KV_HEADS: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # One program per token; it copies all kv heads of that token (a [heads, d] tile).
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, KV_HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
    src = t.to(tl.int64) * stride_kt + heads[:, None] * stride_kh + dims[None, :]
    k = tl.load(key_ptr + src, mask=mask)
    src = t.to(tl.int64) * stride_vt + heads[:, None] * stride_vh + dims[None, :]
    v = tl.load(value_ptr + src, mask=mask)
    dst = block * stride_kc_block + offset * stride_kc_slot + heads[:, None] * stride_kc_head
    tl.store(k_cache_ptr + dst + dims[None, :], k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    dst = block * stride_vc_block + offset * stride_vc_slot + heads[:, None] * stride_vc_head
    tl.store(v_cache_ptr + dst + dims[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2 (exp2)
    stride_qb,
    stride_qh,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    stride_bt,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,  # >= 16: the rows of tl.dot
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,  # key tokens per iteration, >= 16
    IEEE: tl.constexpr,  # float32 inputs: exact dots instead of TF32
    UPCAST: tl.constexpr,  # interpreter + bfloat16: dot in float32 (see _dot)
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < GROUP
    dim_mask = dims < HEAD_DIM
    heads = kv_head * GROUP + rows

    q_off = seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=row_mask[:, None] & dim_mask[None, :], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt

    for start in range(0, seq_len, BLOCK_N):
        pos = start + cols
        col_mask = pos < seq_len
        block = tl.load(bt_row + pos // BLOCK_SIZE, mask=col_mask, other=0).to(tl.int64)
        in_block = pos % BLOCK_SIZE
        kv_mask = col_mask[:, None] & dim_mask[None, :]
        k_off = block * stride_kc_block + in_block * stride_kc_slot + kv_head * stride_kc_head
        k = tl.load(k_cache_ptr + k_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE, UPCAST)
        s = tl.where(col_mask[None, :], s * qk_scale, float("-inf"))

        v_off = block * stride_vc_block + in_block * stride_vc_slot + kv_head * stride_vc_head
        v = tl.load(v_cache_ptr + v_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        # Every tile holds at least one visible key (start < seq_len), so the running maximum is
        # finite and the first tile's rescale factor is exp2(-inf) = 0.
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, IEEE, UPCAST)

    # seq_len == 0 (a padding row): l_i == 0 and acc == 0, so the output is 0.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_off = seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + dims[None, :]
    tl.store(
        out_ptr + o_off,
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & dim_mask[None, :],
    )


@triton.jit
def _paged_prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    out_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_qt,
    stride_qh,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query tokens per program, >= 16
    BLOCK_N: tl.constexpr,  # key tokens per iteration, >= 16
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:  # the grid is sized for the longest query of the batch
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # tokens before this step's first query token

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the sequence
    dims = tl.arange(0, HEAD_DIM_PAD)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < q_len
    dim_mask = dims < HEAD_DIM
    q_pos = ctx_len + rows  # positions of the query tokens

    q_off = (q_start + rows).to(tl.int64)[:, None] * stride_qt + head * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=row_mask[:, None] & dim_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt

    # Keys past the tile's last query position are invisible to every row of the tile.
    # (Rows past q_len have positions >= seq_len; the seq_len bound keeps their keys in range.)
    key_end = tl.minimum(seq_len, ctx_len + (tile + 1) * BLOCK_M)
    for start in range(0, key_end, BLOCK_N):
        pos = start + cols
        col_mask = pos < seq_len
        block = tl.load(bt_row + pos // BLOCK_SIZE, mask=col_mask, other=0).to(tl.int64)
        in_block = pos % BLOCK_SIZE
        kv_mask = col_mask[:, None] & dim_mask[None, :]
        k_off = block * stride_kc_block + in_block * stride_kc_slot + kv_head * stride_kc_head
        k = tl.load(k_cache_ptr + k_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE, UPCAST)
        visible = col_mask[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s * qk_scale, float("-inf"))

        v_off = block * stride_vc_block + in_block * stride_vc_slot + kv_head * stride_vc_head
        v = tl.load(v_cache_ptr + v_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        # Key 0 is visible to every row and sits in the first tile, so the running maximum is
        # finite from then on; a later tile fully hidden for a row contributes exp2(-inf) = 0.
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, IEEE, UPCAST)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_off = (q_start + rows).to(tl.int64)[:, None] * stride_ot + head * stride_oh + dims[None, :]
    tl.store(
        out_ptr + o_off,
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & dim_mask[None, :],
    )


# Whether the kernels above are run by Triton's interpreter (TRITON_INTERPRET=1 at import time).
INTERPRETED = type(_paged_decode_kernel).__name__ == "InterpretedFunction"


# --------------------------------------------------------------------------------------------
# wrappers
# --------------------------------------------------------------------------------------------


def _pad(n: int, minimum: int = 1) -> int:
    return max(triton.next_power_of_2(n), minimum)


def _inner_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, ...]:
    """The kernels' cache stride arguments: block, slot in the block, kv head; K then V."""
    return tuple(c.stride(d) for c in (k_cache, v_cache) for d in (1, 2, 0))


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_kv_heads, num_blocks, block_size, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in head_dim")


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``key``/``value`` ``[T, kv, d]`` into the caches at ``slot_mapping`` (-1: skip)."""
    _check_cache(k_cache, v_cache)
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    num_kv_heads, _, block_size, head_dim = k_cache.shape
    key, value = _inner_contiguous(key), _inner_contiguous(value)
    slot_mapping = slot_mapping.contiguous()
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        *_cache_strides(k_cache, v_cache),
        NUM_KV_HEADS=num_kv_heads,
        KV_HEADS_PAD=_pad(num_kv_heads),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=_pad(head_dim),
        BLOCK_SIZE=block_size,
    )


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """One query token per sequence against its paged context; returns ``[B, heads, d]``.

    Launches a fixed grid (no host sync), so it can be captured in a CUDA graph.
    """
    del max_seq_len  # each program reads its own length
    _check_cache(k_cache, v_cache)
    batch, num_heads, head_dim = query.shape
    num_kv_heads, _, block_size, _ = k_cache.shape
    group = num_heads // num_kv_heads
    query = _inner_contiguous(query)
    block_tables = block_tables.contiguous()
    out = torch.empty(batch, num_heads, head_dim, dtype=query.dtype, device=query.device)
    if batch == 0:
        return out
    _paged_decode_kernel[(batch, num_kv_heads)](
        query,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        float(scale) * LOG2E,
        query.stride(0),
        query.stride(1),
        *_cache_strides(k_cache, v_cache),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=_pad(group, 16),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=_pad(head_dim, 16),
        BLOCK_SIZE=block_size,
        BLOCK_N=64,
        IEEE=query.dtype == torch.float32,
        UPCAST=INTERPRETED and query.dtype == torch.bfloat16,
    )
    return out


def paged_prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    max_query_len: int | None = None,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal varlen attention of new tokens over their paged context; returns ``[T, heads, d]``.

    Without ``max_query_len`` the grid size costs one host sync (reading the query lengths).
    ``key``/``value`` (this step's new keys/values) are accepted for the common signature and
    ignored: the kernel reads every key from the cache.
    """
    del key, value
    _check_cache(k_cache, v_cache)
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads, _, block_size, _ = k_cache.shape
    batch = seq_lens.shape[0]
    query = _inner_contiguous(query)
    block_tables = block_tables.contiguous()
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or batch == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    block_m = 16 if max_query_len <= 16 else 32  # TODO(perf): 64/128 on the GPU for long prompts
    grid = (batch, triton.cdiv(max_query_len, block_m), num_heads)
    _paged_prefill_kernel[grid](
        query,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        out,
        float(scale) * LOG2E,
        query.stride(0),
        query.stride(1),
        *_cache_strides(k_cache, v_cache),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=_pad(head_dim, 16),
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=32,
        IEEE=query.dtype == torch.float32,
        UPCAST=INTERPRETED and query.dtype == torch.bfloat16,
    )
    return out
