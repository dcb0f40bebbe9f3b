"""Paged attention: the torch reference and the backend switch.

Layout shared by every backend (one layer):

* ``k_cache``, ``v_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]``. The token at
  position ``p`` of a sequence with block table ``bt`` lives in slot
  ``bt[p // block_size] * block_size + p % block_size`` of the flattened
  ``[num_blocks * block_size, num_kv_heads, head_dim]`` view.
* Grouped-query attention: ``num_heads = num_kv_heads * group``; query head ``h`` reads kv head
  ``h // group``.
* Scores and softmax are computed in float32 whatever the input dtype (float32, float16,
  bfloat16); outputs have the query's dtype.
* Cache slots that are never attended (the tail of a partially filled last block, blocks named by
  block-table padding) may hold any *finite* values: allocate caches with ``torch.zeros``, not
  ``torch.empty`` (the torch reference multiplies masked-out values by zero, and ``0 * nan`` is
  nan).

The three functions, with the same signatures in every backend:

``write_kv_cache(key, value, k_cache, v_cache, slot_mapping)``
    ``key``/``value`` ``[T, num_kv_heads, head_dim]``, ``slot_mapping`` ``[T]`` int64; writes in
    place. A slot of ``-1`` is skipped (padding).

``paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale,
*, max_seq_len=None) -> out``
    One new token per sequence (already written to the cache). ``query`` ``[B, num_heads,
    head_dim]``, ``block_tables`` ``[B, max_blocks]`` int32 (padding entries arbitrary but in
    range, e.g. 0), ``seq_lens`` ``[B]`` int32 = tokens in the cache including the new one.
    Attends to positions ``0 .. seq_len - 1``. A sequence with ``seq_len == 0`` (a padding row)
    gets zeros. ``max_seq_len`` is an optional host-side hint (an upper bound of ``seq_lens``)
    that spares the torch backend a device sync on CUDA; it is never needed for correctness.

``paged_prefill_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
scale, *, max_query_len=None) -> out``
    Varlen batch. ``query`` ``[T, num_heads, head_dim]`` concatenates each sequence's new tokens;
    ``query_start_loc`` ``[B + 1]`` int32 holds the cumulative offsets; ``seq_lens`` ``[B]`` =
    tokens in the cache after this step (context + new, the new ones already written). Query
    token ``j`` of sequence ``b`` sits at position ``seq_lens[b] - q_len_b + j`` and attends
    causally to cache positions ``0 ..`` that position, which covers chunked prefill and
    prefix-cache hits. ``max_query_len`` is an optional host-side hint (an upper bound of the
    query lengths) that spares the Triton backend a device sync.

``get_attention_backend(name, device)`` picks an implementation: ``"torch"``, ``"triton"`` or
``"auto"`` (Triton when the device is CUDA and Triton imports, the torch reference otherwise).
The Triton module is imported only when it is chosen, so CPU users never need Triton.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "BACKEND_NAMES",
    "AttentionBackend",
    "get_attention_backend",
    "paged_decode_attention",
    "paged_prefill_attention",
    "triton_available",
    "write_kv_cache",
]

BACKEND_NAMES = ("auto", "torch", "triton")

# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5 on.
_SDPA_GQA = torch.torch_version.TorchVersion(torch.__version__) >= "2.5"


# --------------------------------------------------------------------------------------------
# torch reference
#
# This is also the production path on the CPU (``kvops serve`` on a laptop), so it is written for
# speed: decode is one batched SDPA call over the gathered blocks, prefill one SDPA call per
# sequence, cache writes one index_copy_ per tensor.
# --------------------------------------------------------------------------------------------


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``key``/``value`` ``[T, kv, d]`` into the caches at ``slot_mapping`` (-1: skip)."""
    if key.shape[0] == 0:
        return
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    k_flat = k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    v_flat = v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    slots = slot_mapping.to(device=k_cache.device, dtype=torch.long)
    if bool((slots < 0).any()):  # padding tokens; a host sync, cheap on the CPU
        keep = slots >= 0
        slots, key, value = slots[keep], key[keep], value[keep]
    k_flat.index_copy_(0, slots, key.to(k_cache.dtype))
    v_flat.index_copy_(0, slots, value.to(v_cache.dtype))


class _Workspace(threading.local):
    """Per-thread scratch buffers for the CPU gathers, reused from step to step.

    A fresh multi-megabyte tensor per gather costs hundreds of page faults on every call (glibc
    hands large allocations back to the kernel on free); on the CPU that doubled the time of a
    decode step. Buffers only grow, up to ``_WORKSPACE_MAX_BYTES`` each; bigger gathers allocate.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = self.buffers.get((name, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype)
            self.buffers[(name, dtype)] = buffer
        return buffer[:numel]


_WORKSPACE = _Workspace()
_WORKSPACE_MAX_BYTES = 256 << 20


def _gather_blocks(
    cache: torch.Tensor, block_ids: torch.Tensor, name: str, dtype: torch.dtype
) -> torch.Tensor:
    """``cache[block_ids].to(dtype)`` as ``[*block_ids.shape, block_size, kv, d]``.

    index_select over a 2-D view copies whole blocks with memcpy; it is several times faster on
    the CPU than indexing the 4-D tensor. On the CPU the result lives in this thread's workspace
    buffer ``name``: it is valid until the next gather into the same buffer.
    """
    num_blocks = cache.shape[0]
    flat = cache.view(num_blocks, -1)
    ids = block_ids.reshape(-1)
    numel = ids.numel() * flat.shape[1]
    if cache.device.type == "cpu" and numel * 4 <= _WORKSPACE_MAX_BYTES:
        out = _WORKSPACE.get(name, numel, cache.dtype).view(ids.numel(), flat.shape[1])
        torch.index_select(flat, 0, ids, out=out)
        if dtype != cache.dtype:
            out = _WORKSPACE.get(name, numel, dtype).view_as(out).copy_(out)
    else:
        out = flat.index_select(0, ids).to(dtype)
    return out.view(*block_ids.shape, *cache.shape[1:])


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
    """One query token per sequence against its paged context; returns ``[B, heads, d]``."""
    batch, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if batch == 0:
        return query.new_empty(batch, num_heads, head_dim)
    device = k_cache.device
    seq_lens = seq_lens.to(device)
    if max_seq_len is None:
        # On the CPU reading the maximum is free; elsewhere avoid the sync and use the whole
        # table (its width is the caller's bound on the context).
        max_seq_len = (
            int(seq_lens.max()) if device.type == "cpu" else block_tables.shape[1] * block_size
        )
    num_ctx_blocks = min(-(-max(max_seq_len, 1) // block_size), block_tables.shape[1])
    max_len = num_ctx_blocks * block_size
    block_ids = block_tables[:, :num_ctx_blocks].to(device=device, dtype=torch.long)

    # [B, blocks, block_size, kv, d] -> [B, kv, L, d] (a strided view; SDPA takes it as is).
    shape = (batch, max_len, num_kv_heads, head_dim)
    key = _gather_blocks(k_cache, block_ids, "key", torch.float32).view(shape).transpose(1, 2)
    value = _gather_blocks(v_cache, block_ids, "value", torch.float32).view(shape).transpose(1, 2)
    # GQA without repeating K/V: the group's query heads become a length-`group` query.
    q = query.reshape(batch, num_kv_heads, group, head_dim).float()

    # Additive float mask (faster than a boolean one in CPU SDPA). Position 0 stays visible even
    # for seq_len == 0 so that no row is all -inf; those rows are zeroed below.
    positions = torch.arange(max_len, device=device)
    hidden = positions[None, :] >= seq_lens.clamp(min=1)[:, None]  # [B, L]
    mask = torch.zeros(batch, 1, 1, max_len, device=device, dtype=torch.float32)
    mask.masked_fill_(hidden.view(batch, 1, 1, max_len), float("-inf"))
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scale)
    out = out.reshape(batch, num_heads, head_dim)
    out = out.masked_fill((seq_lens == 0).view(batch, 1, 1), 0.0)
    return out.to(query.dtype)


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
) -> torch.Tensor:
    """Causal varlen attention of new tokens over their paged context; returns ``[T, heads, d]``.

    One SDPA call per sequence; sequences with a single new token (decode rows of a mixed batch)
    go together through :func:`paged_decode_attention`.
    """
    del max_query_len  # the host lists below are needed anyway
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    if num_tokens == 0:
        return out
    device = k_cache.device
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()

    single = [b for b in range(len(lens)) if starts[b + 1] - starts[b] == 1]
    if single:
        rows = torch.tensor(single, device=device)
        token_idx = torch.tensor([starts[b] for b in single], device=query.device)
        out[token_idx] = paged_decode_attention(
            query.index_select(0, token_idx),
            k_cache,
            v_cache,
            block_tables.index_select(0, rows.to(block_tables.device)),
            seq_lens.to(device).index_select(0, rows),
            scale,
            max_seq_len=max(lens[b] for b in single),
        )

    single_set = set(single)
    for b, seq_len in enumerate(lens):
        start, end = starts[b], starts[b + 1]
        q_len = end - start
        if q_len == 0 or b in single_set:
            continue
        ctx_len = seq_len - q_len
        num_ctx_blocks = -(-seq_len // block_size)
        block_ids = block_tables[b, :num_ctx_blocks].to(device=device, dtype=torch.long)
        # [L, kv, d] -> [kv, L, d]
        key = _gather_blocks(k_cache, block_ids, "key", torch.float32)
        value = _gather_blocks(v_cache, block_ids, "value", torch.float32)
        key = key.view(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1)
        value = value.view(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1)
        gqa = {}
        if group > 1:
            if _SDPA_GQA:
                gqa = {"enable_gqa": True}
            else:
                key = key.repeat_interleave(group, dim=0)
                value = value.repeat_interleave(group, dim=0)
        q = query[start:end].transpose(0, 1).float()  # [heads, q_len, d]
        if ctx_len == 0:
            o = F.scaled_dot_product_attention(q, key, value, is_causal=True, scale=scale, **gqa)
        else:
            # Lower-right-aligned causal mask: query row i sees keys 0 .. ctx_len + i.
            allowed = torch.ones(q_len, seq_len, dtype=torch.bool, device=device).tril(ctx_len)
            o = F.scaled_dot_product_attention(q, key, value, attn_mask=allowed, scale=scale, **gqa)
        out[start:end] = o.transpose(0, 1).to(out.dtype)
    return out


# --------------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionBackend:
    """The three paged-attention functions of one implementation."""

    name: str
    write_kv_cache: Callable[..., None]
    paged_decode_attention: Callable[..., torch.Tensor]
    paged_prefill_attention: Callable[..., torch.Tensor]


TORCH_BACKEND = AttentionBackend(
    name="torch",
    write_kv_cache=write_kv_cache,
    paged_decode_attention=paged_decode_attention,
    paged_prefill_attention=paged_prefill_attention,
)


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _triton_backend(device: torch.device) -> AttentionBackend:
    from kvops.worker.ops import triton_attention  # lazy: CPU users never need Triton

    if device.type != "cuda" and not triton_attention.INTERPRETED:
        raise ValueError(
            f"attention backend 'triton' on device {str(device)!r} needs Triton's interpreter: "
            "set TRITON_INTERPRET=1 before kvops.worker.ops.triton_attention is imported"
        )
    return AttentionBackend(
        name="triton",
        write_kv_cache=triton_attention.write_kv_cache,
        paged_decode_attention=triton_attention.paged_decode_attention,
        paged_prefill_attention=triton_attention.paged_prefill_attention,
    )


def get_attention_backend(name: str = "auto", device: Any = "cpu") -> AttentionBackend:
    """Return the backend ``name`` ("auto", "torch" or "triton") for ``device``.

    "auto" is Triton on CUDA when Triton imports, the torch reference otherwise. "triton" on a
    non-CUDA device only works under ``TRITON_INTERPRET=1`` (tests). Unknown names raise
    ``ValueError``; "triton" without Triton installed raises ``ImportError``.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"attention_backend must be one of {', '.join(BACKEND_NAMES)}, got {name!r}"
        )
    device = torch.device(device)
    if name == "torch":
        return TORCH_BACKEND
    if name == "triton":
        if not triton_available():
            raise ImportError(
                "attention backend 'triton' needs the triton package (pip install 'kvops[gpu]')"
            )
        return _triton_backend(device)
    # auto
    if device.type == "cuda" and triton_available():
        try:
            return _triton_backend(device)
        except ImportError:
            return TORCH_BACKEND
    return TORCH_BACKEND
