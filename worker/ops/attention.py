"""Paged attention: the torch reference and the backend switch.

Layout shared by every backend (one layer):

* ``k_cache``, ``v_cache``: ``[num_kv_heads, num_blocks, block_size, head_dim]`` (kv-head major).
  For kv head ``h``, the token at position ``p`` of a sequence with block table ``bt`` lives in
  slot ``bt[p // block_size] * block_size + p % block_size`` of the flattened
  ``[num_kv_heads, num_blocks * block_size, head_dim]`` view, at ``[h, slot]``. Head-major so
  that one kv head's blocks of one sequence gather into a contiguous ``[L, head_dim]`` matrix,
  the operand CPU attention is fastest on; the Triton kernels take strides and do not care.
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
scale, *, max_query_len=None, key=None, value=None) -> out``
    Varlen batch. ``query`` ``[T, num_heads, head_dim]`` concatenates each sequence's new tokens;
    ``query_start_loc`` ``[B + 1]`` int32 holds the cumulative offsets; ``seq_lens`` ``[B]`` =
    tokens in the cache after this step (context + new, the new ones already written). Query
    token ``j`` of sequence ``b`` sits at position ``seq_lens[b] - q_len_b + j`` and attends
    causally to cache positions ``0 ..`` that position, which covers chunked prefill and
    prefix-cache hits. ``max_query_len`` is an optional host-side hint (an upper bound of the
    query lengths) that spares the Triton backend a device sync. ``key``/``value`` (optional,
    ``[T, num_kv_heads, head_dim]``) are this step's new keys and values, the ones already
    written to the cache; the torch backend attends to them directly for sequences without
    earlier context instead of gathering them back. Backends may ignore them.

``get_attention_backend(name, device)`` picks an implementation: ``"torch"``, ``"triton"``,
``"cpu"`` (the C++ decode and cache-write kernels of ``cpu_attention.py``, torch prefill) or
``"auto"`` (Triton when the device is CUDA and Triton imports; on the CPU, ``"cpu"`` when its
kernel builds; the torch reference otherwise). The Triton module is imported only when it is
chosen, so CPU users never need Triton.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict

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

BACKEND_NAMES = ("auto", "torch", "triton", "cpu")

# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5 on.
_SDPA_GQA = torch.torch_version.TorchVersion(torch.__version__) >= "2.5"


class _SDPAOptions(TypedDict, total=False):
    """Keyword arguments only some torch versions' scaled_dot_product_attention takes."""

    enable_gqa: bool


# --------------------------------------------------------------------------------------------
# torch reference
#
# This is also the production path on the CPU (``kvops serve`` on a laptop), so it is written for
# speed: decode is a few batched SDPA calls over the gathered blocks (rows bucketed by length),
# prefill one SDPA call per sequence (straight on the new keys when there is no earlier context),
# cache writes one index_copy_ per tensor.
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
    num_kv_heads, num_blocks, block_size, head_dim = k_cache.shape
    k_flat = k_cache.view(num_kv_heads, num_blocks * block_size, head_dim)
    v_flat = v_cache.view(num_kv_heads, num_blocks * block_size, head_dim)
    slots = slot_mapping.to(device=k_cache.device, dtype=torch.long)
    if bool((slots < 0).any()):  # padding tokens; a host sync, cheap on the CPU
        keep = slots >= 0
        slots, key, value = slots[keep], key[keep], value[keep]
    # The cache is kv-head major: token t of kv head h goes to k_flat[h, slots[t]].
    k_flat.index_copy_(1, slots, key.transpose(0, 1).to(k_cache.dtype))
    v_flat.index_copy_(1, slots, value.transpose(0, 1).to(v_cache.dtype))


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


def _gather_ids(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Row ids into ``cache.view(num_kv_heads * num_blocks, -1)`` for ``block_ids`` (any shape),
    kv head major: ``[kv, *block_ids.shape]`` flattened."""
    num_kv_heads, num_blocks = cache.shape[:2]
    block_ids = block_ids.to(device=cache.device, dtype=torch.long)
    head_offsets = torch.arange(num_kv_heads, device=cache.device) * num_blocks
    return (head_offsets[:, None] + block_ids.reshape(1, -1)).reshape(-1)


def _gather_blocks(
    cache: torch.Tensor, ids: torch.Tensor, name: str, dtype: torch.dtype
) -> torch.Tensor:
    """The cache blocks named by ``ids`` (from :func:`_gather_ids`) as ``[len(ids), block_size,
    d]`` in ``dtype``, contiguous.

    Because the cache is kv-head major, the blocks of one block-table row land next to each other
    for every kv head: viewed as ``[kv, rows, blocks * block_size, d]`` the result holds one
    contiguous ``[L, d]`` matrix per (kv head, sequence), which is the operand CPU SDPA is fastest
    on (the transposed views of a token-major gather cost it twice the time, and transposing them
    into a copy costs more than it saves).

    index_select over a 2-D ``[kv * num_blocks, block_size * d]`` view copies whole blocks with
    memcpy; it is several times faster on the CPU than indexing the 4-D tensor. On the CPU the
    result lives in this thread's workspace buffer ``name``: it is valid until the next gather
    into the same buffer.
    """
    num_kv_heads, num_blocks = cache.shape[:2]
    flat = cache.view(num_kv_heads * num_blocks, -1)
    numel = ids.numel() * flat.shape[1]
    if cache.device.type == "cpu" and numel * 4 <= _WORKSPACE_MAX_BYTES:
        out = _WORKSPACE.get(name, numel, cache.dtype).view(ids.numel(), flat.shape[1])
        torch.index_select(flat, 0, ids, out=out)
        if dtype != cache.dtype:
            out = _WORKSPACE.get(name, numel, dtype).view_as(out).copy_(out)
    else:
        out = flat.index_select(0, ids).to(dtype)
    return out.view(ids.numel(), *cache.shape[2:])


@dataclass
class _DecodeBucket:
    """Decode rows ``lo .. hi - 1`` attended together over their first ``max_len`` positions."""

    lo: int
    hi: int
    max_len: int
    num_blocks: int  # block-table columns gathered per row (max_len rounded up to blocks)
    ids: torch.Tensor  # gather ids (_gather_ids) of those columns
    mask: torch.Tensor | None  # additive [1, rows, 1, max_len]; None when every row is max_len


def _decode_bucket(
    k_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    lo: int,
    hi: int,
    max_len: int,
    *,
    ragged: bool,
) -> _DecodeBucket:
    """The gather ids and mask of rows ``lo .. hi - 1``; ``ragged``: some row is shorter than
    ``max_len`` (a row with ``seq_len == 0`` still sees position 0 so that no row is all -inf;
    the caller zeroes its output)."""
    block_size = k_cache.shape[2]
    device = k_cache.device
    num_blocks = min(-(-max(max_len, 1) // block_size), block_tables.shape[1])
    max_len = min(max(max_len, 1), num_blocks * block_size)
    ids = _gather_ids(k_cache, block_tables[lo:hi, :num_blocks])
    mask = None
    if ragged:
        # Additive float mask (faster than a boolean one in CPU SDPA), broadcast over kv heads
        # and the group.
        rows = hi - lo
        positions = torch.arange(max_len, device=device)
        hidden = positions[None, :] >= seq_lens[lo:hi].clamp(min=1)[:, None]  # [rows, L]
        mask = torch.zeros(1, rows, 1, max_len, device=device, dtype=torch.float32)
        mask.masked_fill_(hidden.view(1, rows, 1, max_len), float("-inf"))
    return _DecodeBucket(lo, hi, max_len, num_blocks, ids, mask)


def _attend_decode_bucket(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    bucket: _DecodeBucket,
    scale: float,
) -> torch.Tensor:
    """Decode attention of the bucket's rows ``q[:, lo:hi]`` (``q``: ``[kv, rows, group, d]``
    float32); returns ``[kv, hi - lo, group, d]``.

    GQA without repeating K/V: the group's query heads are the "query length" of a (kv head,
    sequence) pair, and SDPA's batch dimensions are (kv head, row).
    """
    num_kv_heads, _, block_size, head_dim = k_cache.shape
    # [kv, rows, blocks * block_size, d], cut to max_len keys: a slice that keeps every [L, d]
    # matrix contiguous (only the row stride grows), which SDPA takes as it is.
    shape = (num_kv_heads, bucket.hi - bucket.lo, bucket.num_blocks * block_size, head_dim)
    keys = slice(0, bucket.max_len)
    key = _gather_blocks(k_cache, bucket.ids, "key", torch.float32).view(shape)[:, :, keys]
    value = _gather_blocks(v_cache, bucket.ids, "value", torch.float32).view(shape)[:, :, keys]
    q = q[:, bucket.lo : bucket.hi]
    return F.scaled_dot_product_attention(q, key, value, attn_mask=bucket.mask, scale=scale)


# One more decode bucket costs about as much as this many padded (row, key position) pairs: the
# extra gather and SDPA calls and their Python. Measured on the CPU with SmolLM2 shapes: values
# from 128 to 1024 all ran about as fast (3-6 buckets for 32 rows of 32..768 tokens); one bucket
# (the old padded batch) took 1.6x as long, one bucket per row 1.3x.
_BUCKET_OVERHEAD = 512


def _decode_buckets(lens: tuple[int, ...]) -> list[tuple[int, int]]:
    """Split rows sorted by decreasing length into runs ``(lo, hi)`` that minimise
    ``sum(_BUCKET_OVERHEAD + (hi - lo) * lens[lo])``, the padded work plus a per-bucket cost.

    Decode lengths in a batch differ widely (a 32-token and a 768-token context side by side), and
    one padded batch does up to twice the needed work. An O(n^2) dynamic program (n = rows; well
    under a millisecond for 64), run once per step: the plan is reused across layers.
    """
    n = len(lens)
    best = [0] + [float("inf")] * n  # best[j]: cheapest split of rows 0 .. j-1
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + _BUCKET_OVERHEAD + (j - i) * lens[i]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    buckets = []
    j = n
    while j > 0:
        buckets.append((cut[j], j))
        j = cut[j]
    return buckets[::-1]


@dataclass
class _DecodePlan:
    """How a CPU decode batch is sorted, bucketed and gathered.

    It depends only on the block tables, the lengths and the cache geometry, which every layer of
    a step shares, so recent plans are kept and reused when those match (compared by value: a
    caller may refill the same tensors in place). Building one costs about a tenth of a layer's
    decode attention.
    """

    lens: list[int]
    block_tables: torch.Tensor  # a private copy, for the comparison
    geometry: tuple[Any, ...]
    rows: torch.Tensor  # rows with seq_len > 0, longest first
    buckets: list[_DecodeBucket]


class _PlanCache(threading.local):
    """This thread's most recent decode plans, newest first. Two: a step may alternate between
    its decode rows and the one-token prefill rows of its mixed batch, layer after layer."""

    SIZE = 2

    def __init__(self) -> None:
        self.plans: list[_DecodePlan] = []


_PLAN_CACHE = _PlanCache()


def _decode_plan(k_cache: torch.Tensor, block_tables: torch.Tensor, lens: list[int]) -> _DecodePlan:
    """The plan for these block tables and host-side lengths: a cached one if it matches."""
    device = k_cache.device
    geometry = (tuple(k_cache.shape[:3]), device)
    for plan in _PLAN_CACHE.plans:
        if (
            plan.lens == lens
            and plan.geometry == geometry
            and plan.block_tables.shape == block_tables.shape
            and torch.equal(plan.block_tables, block_tables)
        ):
            return plan
    order = sorted(range(len(lens)), key=lens.__getitem__, reverse=True)
    order = [i for i in order if lens[i] > 0]  # zero-length (padding) rows get zeros
    sorted_lens = [lens[i] for i in order]
    rows = torch.tensor(order, dtype=torch.long, device=device)
    tables = block_tables.to(device).index_select(0, rows)
    row_lens = torch.tensor(sorted_lens, device=device)
    buckets = [
        _decode_bucket(
            k_cache,
            tables,
            row_lens,
            lo,
            hi,
            sorted_lens[lo],
            ragged=sorted_lens[hi - 1] < sorted_lens[lo],
        )
        for lo, hi in _decode_buckets(tuple(sorted_lens))
    ]
    plan = _DecodePlan(list(lens), block_tables.clone(), geometry, rows, buckets)
    _PLAN_CACHE.plans = [plan, *_PLAN_CACHE.plans[: _PLAN_CACHE.SIZE - 1]]
    return plan


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

    On the CPU the rows are sorted by length and attended in a few buckets of similar lengths
    (:func:`_decode_buckets`), so short contexts are not padded to the longest one. Elsewhere one
    padded bucket, without reading the lengths on the host.
    """
    batch, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[0]
    group = num_heads // num_kv_heads
    if batch == 0:
        return query.new_empty(batch, num_heads, head_dim)
    device = k_cache.device
    seq_lens = seq_lens.to(device)
    if device.type != "cpu":
        # Avoid a device sync: without the hint use the whole table (its width is the caller's
        # bound on the context).
        if max_seq_len is None:
            max_seq_len = block_tables.shape[1] * k_cache.shape[2]
        q = query.view(batch, num_kv_heads, group, head_dim).transpose(0, 1).float()
        tables = block_tables.to(device)
        bucket = _decode_bucket(k_cache, tables, seq_lens, 0, batch, max_seq_len, ragged=True)
        out = _attend_decode_bucket(q, k_cache, v_cache, bucket, scale)
        out = out.transpose(0, 1).reshape(batch, num_heads, head_dim)
        out = out.masked_fill((seq_lens == 0).view(batch, 1, 1), 0.0)
        return out.to(query.dtype)

    plan = _decode_plan(k_cache, block_tables, seq_lens.tolist())
    out = query.new_zeros(batch, num_heads, head_dim)
    live = plan.rows.numel()
    if live == 0:
        return out
    # [kv, live, group, d], contiguous and in length order; bucket slices stay contiguous per row.
    q = query.view(batch, num_kv_heads, group, head_dim).index_select(0, plan.rows)
    q = q.transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format)
    attended = torch.empty_like(q)
    for bucket in plan.buckets:
        attended[:, bucket.lo : bucket.hi] = _attend_decode_bucket(
            q, k_cache, v_cache, bucket, scale
        )
    attended = attended.transpose(0, 1).reshape(live, num_heads, head_dim)
    out.index_copy_(0, plan.rows, attended.to(query.dtype))
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

    One SDPA call per sequence; sequences with a single new token (decode rows of a mixed batch)
    go together through :func:`paged_decode_attention`. ``key``/``value`` ``[T, kv, d]``, when
    given, are this step's new keys and values (the ones already written to the cache): a
    sequence with no earlier context (a whole prompt without a prefix-cache hit, the common case)
    attends to them directly instead of gathering its blocks back from the cache.
    """
    del max_query_len  # the host lists below are needed anyway
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads, _, block_size, _ = k_cache.shape
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
        if ctx_len == 0 and key is not None and value is not None:
            # The keys are exactly this step's: no gather. Rounded through the cache dtype so the
            # result equals attending to the cache. SDPA takes the [kv, q_len, d] views as they
            # are; with q_len queries per key a copy would not pay off.
            k = key[start:end].to(k_cache.dtype).float().transpose(0, 1)
            v = value[start:end].to(v_cache.dtype).float().transpose(0, 1)
        else:
            num_ctx_blocks = -(-seq_len // block_size)
            ids = _gather_ids(k_cache, block_tables[b, :num_ctx_blocks])
            # [kv * blocks, block_size, d] -> [kv, L, d]
            k = _gather_blocks(k_cache, ids, "key", torch.float32)
            v = _gather_blocks(v_cache, ids, "value", torch.float32)
            k = k.view(num_kv_heads, -1, head_dim)[:, :seq_len]
            v = v.view(num_kv_heads, -1, head_dim)[:, :seq_len]
        gqa: _SDPAOptions = {}
        if group > 1:
            if _SDPA_GQA:
                gqa = {"enable_gqa": True}
            else:
                k = k.repeat_interleave(group, dim=0)
                v = v.repeat_interleave(group, dim=0)
        q = query[start:end].transpose(0, 1).float()  # [heads, q_len, d]
        if ctx_len == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **gqa)
        else:
            # Lower-right-aligned causal mask: query row i sees keys 0 .. ctx_len + i.
            allowed = torch.ones(q_len, seq_len, dtype=torch.bool, device=device).tril(ctx_len)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, **gqa)
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


def _cpu_backend() -> AttentionBackend:
    from kvops.worker.ops import cpu_attention  # lazy: it imports this module

    return AttentionBackend(
        name="cpu",
        write_kv_cache=cpu_attention.write_kv_cache,
        paged_decode_attention=cpu_attention.paged_decode_attention,
        paged_prefill_attention=paged_prefill_attention,
    )


def get_attention_backend(name: str = "auto", device: Any = "cpu") -> AttentionBackend:
    """Return the backend ``name`` ("auto", "torch", "triton" or "cpu") for ``device``.

    "auto" is Triton on CUDA when Triton imports, "cpu" on the CPU when its C++ kernel builds
    (the first call builds it), the torch reference otherwise. "triton" on a non-CUDA device only
    works under ``TRITON_INTERPRET=1`` (tests). "cpu" needs the CPU; if its kernel does not
    build it runs the torch reference. Unknown names raise ``ValueError``; "triton" without
    Triton installed raises ``ImportError``.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"attention_backend must be one of {', '.join(BACKEND_NAMES)}, got {name!r}"
        )
    device = torch.device(device)
    if name == "torch":
        return TORCH_BACKEND
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"attention backend 'cpu' runs on the CPU, not {str(device)!r}")
        return _cpu_backend()
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
    if device.type == "cpu":
        from kvops.worker.ops import cpu_attention

        if cpu_attention.extension_available():
            return _cpu_backend()
    return TORCH_BACKEND
