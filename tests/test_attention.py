"""Paged attention: the torch reference against a naive dense implementation, the C++ CPU decode
kernel against the naive one, and the Triton kernels against the torch reference (under
TRITON_INTERPRET=1 on the CPU, on the GPU when there is one; tests/conftest.py sets the switch)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kvops.worker.ops import attention as ref
from kvops.worker.ops import cpu_attention
from kvops.worker.ops import triton_attention as tri  # no skip: triton is a declared dependency

CUDA = torch.cuda.is_available()
TORCH_DEVICES = ["cpu", "cuda"] if CUDA else ["cpu"]
TRITON_DEVICES = ["cuda"] if CUDA else ["cpu"]  # cpu: Triton's interpreter

TOLERANCE = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


# --------------------------------------------------------------------------------------------
# test data and the naive implementation
# --------------------------------------------------------------------------------------------


@dataclass
class PagedCase:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [B, max_blocks + 1], padded with block 0
    seq_lens: torch.Tensor  # int32 [B]
    q_lens: list[int]
    query: torch.Tensor  # [sum(q_lens), heads, d]
    query_start_loc: torch.Tensor  # int32 [B + 1]
    scale: float


def make_case(
    seq_lens: list[int],
    q_lens: list[int],
    *,
    block_size: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> PagedCase:
    """Random caches (every slot filled, so unattended slots hold garbage that must stay masked),
    block tables over shuffled blocks with one padding column, and queries."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    width = max(blocks_per_seq, default=0) + 1
    num_blocks = sum(blocks_per_seq) + 3
    shape = (num_kv_heads, num_blocks, block_size, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    num_heads = num_kv_heads * group
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    return PagedCase(
        k_cache=k_cache.to(device),
        v_cache=v_cache.to(device),
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        q_lens=list(q_lens),
        query=query.to(device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        scale=head_dim**-0.5,
    )


def naive_attention(case: PagedCase) -> torch.Tensor:
    """Dense per-token attention in float64: contiguous K/V rebuilt slot by slot."""
    k_cache, v_cache = case.k_cache.cpu().double(), case.v_cache.cpu().double()
    num_kv_heads, num_blocks, block_size, head_dim = k_cache.shape
    # [kv, num_blocks * block_size, d] -> [slots, kv, d]
    k_flat = k_cache.reshape(num_kv_heads, num_blocks * block_size, head_dim).transpose(0, 1)
    v_flat = v_cache.reshape(num_kv_heads, num_blocks * block_size, head_dim).transpose(0, 1)
    query = case.query.cpu().double()
    group = query.shape[1] // num_kv_heads
    out = torch.zeros_like(query)
    bt = case.block_tables.cpu().tolist()
    token = 0
    for b, (seq_len, q_len) in enumerate(zip(case.seq_lens.tolist(), case.q_lens, strict=True)):
        slots = [bt[b][p // block_size] * block_size + p % block_size for p in range(seq_len)]
        keys = k_flat[slots].repeat_interleave(group, dim=1)  # [L, heads, d]
        values = v_flat[slots].repeat_interleave(group, dim=1)
        for j in range(q_len):
            pos = seq_len - q_len + j
            scores = torch.einsum("hd,lhd->hl", query[token], keys) * case.scale
            visible = torch.arange(seq_len) <= pos
            scores[:, ~visible] = float("-inf")
            probs = torch.softmax(scores, dim=-1)
            out[token] = torch.einsum("hl,lhd->hd", probs, values)
            token += 1
    return out


def decode_query(case: PagedCase) -> torch.Tensor:
    assert all(n == 1 for n in case.q_lens)
    return case.query


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), **TOLERANCE[dtype])


# Mixed lengths for block_size 4: exact block boundaries (4, 8), partially filled last blocks
# (5, 11, 13), a single token (1).
DECODE_LENS = [5, 8, 1, 13, 4, 11]
# (seq_len, q_len) for block_size 4: whole prompts (no context), chunked prefill / prefix hits
# (context before the queries, ending on and off block boundaries), a decode row (q_len 1).
PREFILL_LENS = [(7, 7), (12, 3), (9, 4), (13, 1), (16, 8), (4, 4)]

GQA = [(4, 1), (2, 3), (2, 4)]  # (num_kv_heads, group): MHA, SmolLM2-like 3, Llama-like 4


# --------------------------------------------------------------------------------------------
# torch reference vs naive
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", TORCH_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("num_kv_heads", "group"), GQA)
def test_reference_decode_matches_naive(device, dtype, head_dim, num_kv_heads, group):
    case = make_case(
        DECODE_LENS,
        [1] * len(DECODE_LENS),
        block_size=4,
        num_kv_heads=num_kv_heads,
        group=group,
        head_dim=head_dim,
        dtype=dtype,
        device=device,
    )
    out = ref.paged_decode_attention(
        decode_query(case),
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.seq_lens,
        case.scale,
    )
    assert out.dtype == dtype and out.shape == case.query.shape
    assert_close(out, naive_attention(case), dtype)


@pytest.mark.parametrize("device", TORCH_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("num_kv_heads", "group"), GQA)
def test_reference_prefill_matches_naive(device, dtype, head_dim, num_kv_heads, group):
    seq_lens, q_lens = zip(*PREFILL_LENS, strict=True)
    case = make_case(
        list(seq_lens),
        list(q_lens),
        block_size=4,
        num_kv_heads=num_kv_heads,
        group=group,
        head_dim=head_dim,
        dtype=dtype,
        device=device,
    )
    out = ref.paged_prefill_attention(
        case.query,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.seq_lens,
        case.query_start_loc,
        case.scale,
    )
    assert out.dtype == dtype and out.shape == case.query.shape
    assert_close(out, naive_attention(case), dtype)


@pytest.mark.parametrize("block_size", [1, 16])
def test_reference_block_sizes(block_size):
    seq_lens, q_lens = [40, 16, 17, 33], [40, 16, 2, 1]
    case = make_case(seq_lens, q_lens, block_size=block_size, num_kv_heads=3, group=3, head_dim=64)
    args = (case.k_cache, case.v_cache, case.block_tables, case.seq_lens)
    out = ref.paged_prefill_attention(case.query, *args, case.query_start_loc, case.scale)
    assert_close(out, naive_attention(case), torch.float32)


def test_reference_decode_max_seq_len_hint_and_padding_row():
    case = make_case([9, 3], [1, 1], block_size=4, num_kv_heads=2, group=2, head_dim=64)
    args = (case.query, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.scale)
    expected = naive_attention(case)
    assert_close(ref.paged_decode_attention(*args, max_seq_len=12), expected, torch.float32)
    # A padding row (seq_len 0, as in a batch padded for a CUDA graph) gives zeros.
    seq_lens = torch.tensor([9, 0], dtype=torch.int32)
    out = ref.paged_decode_attention(*args[:4], seq_lens, case.scale)
    assert_close(out[0], expected[0], torch.float32)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_reference_decode_buckets_mixed_lengths():
    """Many rows of scattered lengths (so the CPU path splits them into several length buckets),
    with ties, a one-token row and padding rows (seq_len 0) in the middle of the batch."""
    seq_lens = [33, 0, 180, 7, 1, 96, 180, 250, 16, 0, 61, 129, 17, 240, 5, 64]
    case = make_case(
        seq_lens, [1] * len(seq_lens), block_size=16, num_kv_heads=3, group=3, head_dim=64
    )
    assert len(ref._decode_buckets(tuple(sorted((n for n in seq_lens if n), reverse=True)))) > 1
    out = ref.paged_decode_attention(
        case.query, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.scale
    )
    expected = naive_attention(case)
    for row, n in enumerate(seq_lens):
        if n == 0:
            assert torch.equal(out[row], torch.zeros_like(out[row]))
            expected[row] = 0
    assert_close(out, expected, torch.float32)


def test_reference_decode_plan_reuse_sees_refilled_tensors():
    """The CPU decode plan is reused across calls (layers); a caller that refills the same block
    table and length tensors in place must still get attention over the new contents."""
    case = make_case([9, 30, 17], [1, 1, 1], block_size=4, num_kv_heads=2, group=3, head_dim=64)
    args = (case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.scale)
    assert_close(
        ref.paged_decode_attention(case.query, *args), naive_attention(case), torch.float32
    )
    # Same lengths, other blocks: a permutation of each row's blocks.
    for row, n in enumerate([9, 30, 17]):
        used = -(-n // 4)
        case.block_tables[row, :used] = case.block_tables[row, :used].flip(0)
    assert_close(
        ref.paged_decode_attention(case.query, *args), naive_attention(case), torch.float32
    )
    # Same table, other lengths.
    case.seq_lens.copy_(torch.tensor([5, 30, 0], dtype=torch.int32))
    out = ref.paged_decode_attention(case.query, *args)
    expected = naive_attention(case)
    expected[2] = 0
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("lens", [(5,), (9, 9, 9), (300, 200, 40, 39, 38, 3, 2, 1), (7, 1) * 20])
def test_decode_buckets_partition_the_rows(lens):
    lens = tuple(sorted(lens, reverse=True))
    buckets = ref._decode_buckets(lens)
    assert buckets[0][0] == 0 and buckets[-1][1] == len(lens)
    assert all(lo < hi for lo, hi in buckets)
    assert all(a[1] == b[0] for a, b in zip(buckets, buckets[1:], strict=False))


def new_tokens_kv(case: PagedCase) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache contents at each query token's position: the ``key``/``value`` a model step
    passes to paged_prefill_attention after writing them."""
    num_kv_heads, num_blocks, block_size, head_dim = case.k_cache.shape
    bt = case.block_tables.cpu().tolist()
    slots = []
    for b, (seq_len, q_len) in enumerate(zip(case.seq_lens.tolist(), case.q_lens, strict=True)):
        for pos in range(seq_len - q_len, seq_len):
            slots.append(bt[b][pos // block_size] * block_size + pos % block_size)
    slots = torch.tensor(slots, device=case.k_cache.device)
    flat_shape = (num_kv_heads, num_blocks * block_size, head_dim)
    key = case.k_cache.reshape(flat_shape)[:, slots].transpose(0, 1)
    value = case.v_cache.reshape(flat_shape)[:, slots].transpose(0, 1)
    return key, value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_prefill_with_new_keys_and_values(dtype):
    """Passing the step's new key/value (used for sequences without earlier context) gives what
    reading everything from the cache gives; sequences with context still read the cache."""
    seq_lens, q_lens = zip(*PREFILL_LENS, strict=True)
    case = make_case(
        list(seq_lens),
        list(q_lens),
        block_size=4,
        num_kv_heads=2,
        group=3,
        head_dim=64,
        dtype=dtype,
    )
    key, value = new_tokens_kv(case)
    args = (case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.query_start_loc)
    out = ref.paged_prefill_attention(case.query, *args, case.scale, key=key, value=value)
    expected = ref.paged_prefill_attention(case.query, *args, case.scale)
    assert_close(out, expected, dtype)
    assert_close(out, naive_attention(case), dtype)


@pytest.mark.parametrize("workspace", [True, False])
def test_reference_outputs_do_not_alias_the_workspace(monkeypatch, workspace):
    """CPU gathers reuse per-thread buffers (or allocate past the size cap): an earlier result
    must survive a later call."""
    if not workspace:
        monkeypatch.setattr(ref, "_WORKSPACE_MAX_BYTES", 0)
    first = make_case([7, 5], [1, 1], block_size=4, num_kv_heads=2, group=2, head_dim=64)
    second = make_case([9, 6], [4, 1], block_size=4, num_kv_heads=2, group=2, head_dim=64, seed=1)
    args = (first.k_cache, first.v_cache, first.block_tables, first.seq_lens, first.scale)
    out = ref.paged_decode_attention(first.query, *args)
    kept = out.clone()
    ref.paged_prefill_attention(
        second.query,
        second.k_cache,
        second.v_cache,
        second.block_tables,
        second.seq_lens,
        second.query_start_loc,
        second.scale,
    )
    assert torch.equal(out, kept)
    assert_close(out, naive_attention(first), torch.float32)


def test_reference_empty_batches():
    case = make_case([5], [1], block_size=4, num_kv_heads=2, group=2, head_dim=64)
    empty_q = case.query[:0]
    out = ref.paged_decode_attention(
        empty_q, case.k_cache, case.v_cache, case.block_tables[:0], case.seq_lens[:0], 1.0
    )
    assert out.shape == (0, 4, 64)
    out = ref.paged_prefill_attention(
        empty_q,
        case.k_cache,
        case.v_cache,
        case.block_tables[:0],
        case.seq_lens[:0],
        torch.zeros(1, dtype=torch.int32),
        1.0,
    )
    assert out.shape == (0, 4, 64)


def write_expected(key, value, k_cache, v_cache, slot_mapping):
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    block_size = k_cache.shape[2]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_cache[:, slot // block_size, slot % block_size] = key[t]
            v_cache[:, slot // block_size, slot % block_size] = value[t]
    return k_cache, v_cache


@pytest.mark.parametrize("device", TORCH_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_write_kv_cache(device, dtype):
    gen = torch.Generator().manual_seed(1)
    k_cache = torch.randn(2, 5, 4, 64, generator=gen).to(dtype).to(device)
    v_cache = torch.randn(2, 5, 4, 64, generator=gen).to(dtype).to(device)
    key = torch.randn(6, 2, 64, generator=gen).to(dtype).to(device)
    value = torch.randn(6, 2, 64, generator=gen).to(dtype).to(device)
    slots = torch.tensor([0, 3, -1, 4, 19, -1], dtype=torch.int64, device=device)
    expected = write_expected(key, value, k_cache, v_cache, slots)
    ref.write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected[0]) and torch.equal(v_cache, expected[1])


def test_reference_chunked_prefill_and_decode_agree_with_one_shot():
    """Writing a prompt in chunks then decoding gives what one-shot prefill gives."""
    gen = torch.Generator().manual_seed(2)
    num_kv_heads, group, head_dim, block_size, length = 3, 3, 64, 4, 14
    heads = num_kv_heads * group
    q = torch.randn(length, heads, head_dim, generator=gen)
    k = torch.randn(length, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(length, num_kv_heads, head_dim, generator=gen)
    block_tables = torch.tensor([[3, 0, 5, 1]], dtype=torch.int32)
    slots = torch.tensor([int(block_tables[0, p // 4]) * 4 + p % 4 for p in range(length)])

    def fresh():
        shape = (num_kv_heads, 6, block_size, head_dim)
        return torch.zeros(shape), torch.zeros(shape)

    k_cache, v_cache = fresh()
    ref.write_kv_cache(k, v, k_cache, v_cache, slots)
    one_shot = ref.paged_prefill_attention(
        q,
        k_cache,
        v_cache,
        block_tables,
        torch.tensor([length], dtype=torch.int32),
        torch.tensor([0, length], dtype=torch.int32),
        0.125,
    )

    k_cache, v_cache = fresh()
    pieces = []
    for lo, hi in [(0, 5), (5, 13)]:
        ref.write_kv_cache(k[lo:hi], v[lo:hi], k_cache, v_cache, slots[lo:hi])
        pieces.append(
            ref.paged_prefill_attention(
                q[lo:hi],
                k_cache,
                v_cache,
                block_tables,
                torch.tensor([hi], dtype=torch.int32),
                torch.tensor([0, hi - lo], dtype=torch.int32),
                0.125,
            )
        )
    ref.write_kv_cache(k[13:], v[13:], k_cache, v_cache, slots[13:])
    pieces.append(
        ref.paged_decode_attention(
            q[13:], k_cache, v_cache, block_tables, torch.tensor([14], dtype=torch.int32), 0.125
        )
    )
    torch.testing.assert_close(torch.cat(pieces), one_shot, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# C++ CPU decode kernel vs naive
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("head_dim", cpu_attention.HEAD_DIMS)
@pytest.mark.parametrize(("num_kv_heads", "group"), GQA)
def test_cpu_kernel_decode_matches_naive(block_size, head_dim, num_kv_heads, group):
    # Exact block boundaries, partially filled last blocks, one token, a padding row (0) in the
    # middle, and lengths far apart so that the threads' shares split inside the batch.
    seq_lens = [5, 8, 1, 0, 13, 4 * block_size, 4 * block_size + 3, 150, 2]
    case = make_case(
        seq_lens,
        [1] * len(seq_lens),
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        group=group,
        head_dim=head_dim,
    )
    args = (case.query, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.scale)
    out = cpu_attention.paged_decode_attention(*args)
    expected = naive_attention(case)
    expected[3] = 0
    assert out.shape == case.query.shape and out.dtype == torch.float32
    assert_close(out, expected, torch.float32)
    assert torch.equal(out[3], torch.zeros_like(out[3]))


def test_cpu_kernel_sharp_softmax_and_strided_query():
    """Scores hundreds apart (the softmax must subtract the maximum, and exp underflows to ~0),
    and a query that is a strided view of a wider tensor (as q[:num_decodes] of a step is)."""
    case = make_case([37, 200], [1, 1], block_size=16, num_kv_heads=2, group=3, head_dim=64)
    wide = torch.cat([case.query, case.query], dim=-1) * 40
    query = wide[..., :64]
    case.query = query.contiguous()
    args = (case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.scale)
    out = cpu_attention.paged_decode_attention(query, *args)
    assert torch.isfinite(out).all()
    assert_close(out, naive_attention(case), torch.float32)


def test_cpu_kernel_falls_back_to_the_reference_for_other_dtypes_and_sizes():
    for dtype, head_dim in [(torch.bfloat16, 64), (torch.float32, 40)]:
        case = make_case(
            [9, 3], [1, 1], block_size=4, num_kv_heads=2, group=2, head_dim=head_dim, dtype=dtype
        )
        args = (
            case.query,
            case.k_cache,
            case.v_cache,
            case.block_tables,
            case.seq_lens,
            case.scale,
        )
        assert torch.equal(
            cpu_attention.paged_decode_attention(*args), ref.paged_decode_attention(*args)
        )


@pytest.mark.parametrize("num_tokens", [6, 700])  # 700: several threads' worth of rows
def test_cpu_kernel_write_kv_cache(num_tokens):
    gen = torch.Generator().manual_seed(2)
    k_cache = torch.randn(3, 300, 4, 64, generator=gen)
    v_cache = torch.randn(3, 300, 4, 64, generator=gen)
    # Strided views of one fused [T, 2 * kv * d] projection, as a fused qkv layer would give.
    kv = torch.randn(num_tokens, 2 * 3 * 64, generator=gen)
    key = kv[:, : 3 * 64].view(num_tokens, 3, 64)
    value = kv[:, 3 * 64 :].view(num_tokens, 3, 64)
    slots = torch.randperm(1200, generator=gen)[:num_tokens]
    slots[::5] = -1  # padding tokens are skipped
    expected = write_expected(key, value, k_cache, v_cache, slots)
    cpu_attention.write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected[0]) and torch.equal(v_cache, expected[1])
    with pytest.raises(RuntimeError, match="is not a slot of the cache"):
        cpu_attention.write_kv_cache(key, value, k_cache, v_cache, slots + 1200)


def test_cpu_kernel_rejects_block_ids_outside_the_cache():
    case = make_case([9, 3], [1, 1], block_size=4, num_kv_heads=2, group=2, head_dim=64)
    tables = case.block_tables.clone()
    tables[1, 0] = case.k_cache.shape[1]  # one past the last block
    with pytest.raises(RuntimeError, match=r"block_tables\[1, 0\]"):
        cpu_attention.paged_decode_attention(
            case.query, case.k_cache, case.v_cache, tables, case.seq_lens, case.scale
        )
    too_long = torch.tensor([9, 100], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        cpu_attention.paged_decode_attention(
            case.query, case.k_cache, case.v_cache, case.block_tables, too_long, case.scale
        )


# --------------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------------


def test_backend_selection():
    assert ref.get_attention_backend("torch", "cpu").name == "torch"
    # The C++ kernel must build here: a failed build would silently fall back to the reference.
    assert cpu_attention.extension_available()
    cpu = ref.get_attention_backend("auto", "cpu")
    assert cpu.name == "cpu" and cpu.paged_decode_attention is cpu_attention.paged_decode_attention
    assert cpu.write_kv_cache is cpu_attention.write_kv_cache
    assert ref.get_attention_backend("cpu", "cpu").name == "cpu"
    backend = ref.get_attention_backend("triton", TRITON_DEVICES[0])
    assert backend.name == "triton"
    assert backend.paged_decode_attention is tri.paged_decode_attention
    if CUDA:
        assert ref.get_attention_backend("auto", "cuda").name == "triton"
    with pytest.raises(ValueError, match="attention_backend"):
        ref.get_attention_backend("flash", "cpu")


# --------------------------------------------------------------------------------------------
# Triton kernels vs the torch reference (tiny shapes: the interpreter is slow)
# --------------------------------------------------------------------------------------------

TRITON_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_triton_write_kv_cache(device, dtype):
    gen = torch.Generator().manual_seed(3)
    k_cache = torch.randn(3, 5, 4, 64, generator=gen).to(dtype).to(device)
    v_cache = torch.randn(3, 5, 4, 64, generator=gen).to(dtype).to(device)
    # A fused projection: key and value are strided views of one [T, 2 * kv * d] tensor.
    kv = torch.randn(6, 2 * 3 * 64, generator=gen).to(dtype).to(device)
    key, value = kv[:, : 3 * 64].view(6, 3, 64), kv[:, 3 * 64 :].view(6, 3, 64)
    slots = torch.tensor([0, 3, -1, 4, 19, -1], dtype=torch.int64, device=device)
    expected = write_expected(key, value, k_cache, v_cache, slots)
    tri.write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected[0]) and torch.equal(v_cache, expected[1])


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(
    ("dtype", "head_dim", "num_kv_heads", "group", "block_size"),
    [
        (torch.float32, 64, 2, 1, 4),
        (torch.float32, 64, 1, 3, 16),
        (torch.float32, 128, 1, 4, 8),
        (torch.bfloat16, 64, 1, 3, 4),
        (torch.float16, 128, 2, 4, 16),
    ],
)
def test_triton_decode_matches_reference(device, dtype, head_dim, num_kv_heads, group, block_size):
    # Lengths across tile (64) and block boundaries; one padding row (seq_len 0).
    seq_lens = [block_size, 3 * block_size + 1, 70, 0]
    case = make_case(
        seq_lens,
        [1] * len(seq_lens),
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        group=group,
        head_dim=head_dim,
        dtype=dtype,
        device=device,
    )
    args = (case.query, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.scale)
    out = tri.paged_decode_attention(*args)
    assert out.dtype == dtype and out.shape == case.query.shape
    assert_close(out, ref.paged_decode_attention(*args), dtype)
    assert torch.equal(out[3].cpu(), torch.zeros_like(out[3].cpu()))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(
    ("dtype", "head_dim", "num_kv_heads", "group", "block_size"),
    [
        (torch.float32, 64, 2, 1, 4),
        (torch.float32, 64, 1, 3, 16),
        (torch.float32, 128, 1, 4, 8),
        (torch.bfloat16, 64, 1, 3, 4),
        (torch.float16, 128, 1, 2, 16),
    ],
)
def test_triton_prefill_matches_reference(device, dtype, head_dim, num_kv_heads, group, block_size):
    # (seq_len, q_len): a 40-token prompt (two 32-row query tiles), a chunk after 9 tokens of
    # context whose tiles cross the causal boundary off a block boundary, a decode row, a prompt
    # ending exactly on a block boundary.
    lens = [(40, 40), (46, 37), (2 * block_size + 3, 1), (block_size, block_size)]
    case = make_case(
        [s for s, _ in lens],
        [q for _, q in lens],
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        group=group,
        head_dim=head_dim,
        dtype=dtype,
        device=device,
    )
    args = (
        case.query,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.seq_lens,
        case.query_start_loc,
        case.scale,
    )
    out = tri.paged_prefill_attention(*args)
    assert out.dtype == dtype and out.shape == case.query.shape
    assert_close(out, ref.paged_prefill_attention(*args), dtype)
    # The new keys/values, as the model passes them: Triton ignores them, torch uses them.
    key, value = new_tokens_kv(case)
    out = tri.paged_prefill_attention(*args, key=key, value=value)
    assert_close(out, ref.paged_prefill_attention(*args, key=key, value=value), dtype)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_prefill_short_queries_and_strided_query(device):
    """Queries of at most 16 tokens (the 16-row tile) given as a view of a fused QKV tensor."""
    lens = [(7, 7), (12, 3), (9, 4), (13, 1)]
    case = make_case(
        [s for s, _ in lens],
        [q for _, q in lens],
        block_size=4,
        num_kv_heads=2,
        group=3,
        head_dim=64,
        device=device,
    )
    tokens, heads, head_dim = case.query.shape
    qkv = torch.zeros(tokens, (heads + 4) * head_dim, device=device)
    qkv[:, : heads * head_dim] = case.query.reshape(tokens, -1)
    query = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    assert not query.is_contiguous()
    rest = (case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.query_start_loc)
    out = tri.paged_prefill_attention(query, *rest, case.scale, max_query_len=7)
    assert_close(out, naive_attention(case), torch.float32)
