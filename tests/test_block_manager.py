"""The KV block pool: reference counts, prefix hashing, LRU eviction, all-or-nothing allocation."""

from __future__ import annotations

import hashlib

import pytest

from kvops.worker.block_manager import KVCacheManager, block_digest
from kvops.worker.request import Request, SamplingParams

BS = 4


def make_request(request_id: str, tokens: list[int]) -> Request:
    return Request(request_id, tokens, SamplingParams())


def admit(kv: KVCacheManager, request: Request) -> int:
    """What the scheduler does: prefix lookup, allocate the rest, compute it, cache blocks."""
    blocks, num_cached = kv.get_computed_blocks(request)
    assert kv.allocate_slots(request, request.num_tokens - num_cached, blocks)
    request.num_computed_tokens = request.num_tokens
    kv.cache_blocks(request, request.num_computed_tokens)
    return num_cached


def snapshot(kv: KVCacheManager):
    return (
        list(kv._free),
        {k: list(v) for k, v in kv._tables.items()},
        [(b.ref_count, b.block_hash) for b in kv.blocks],
        dict(kv._cached),
    )


def test_allocate_grows_the_table_and_counts_references():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    request = make_request("a", list(range(10)))
    assert kv.allocate_slots(request, 10)
    assert len(kv.block_table("a")) == 3
    assert kv.num_free_blocks == 5
    assert kv.usage == pytest.approx(3 / 8)
    request.num_computed_tokens = 10
    # Two more tokens fit in the third block; a third needs a fourth block.
    assert kv.allocate_slots(request, 2)
    assert len(kv.block_table("a")) == 3
    assert kv.allocate_slots(request, 3)
    assert len(kv.block_table("a")) == 4
    assert all(kv.blocks[b].ref_count == 1 for b in kv.block_table("a"))
    kv.check_invariants(["a"])
    kv.free(request)
    assert kv.num_free_blocks == 8 and kv.usage == 0
    assert kv.block_table("a") == []
    kv.check_invariants([])


def test_blocks_are_keyed_by_chained_sha256_digests():
    """The prefix cache keys are SHA-256 digests chained over whole token blocks: the same block
    after a different prefix is a different key, and large token ids are not truncated."""
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    tokens = [1, 2, 3, 4, 2**40, 6, 7, 8, 9]
    admit(kv, make_request("a", tokens))
    first = hashlib.sha256(b"".join(t.to_bytes(8, "little") for t in tokens[:4])).digest()
    second = block_digest(first, tokens[4:8])
    assert block_digest(b"", tokens[:4]) == first
    assert {first: kv.block_table("a")[0], second: kv.block_table("a")[1]} == kv._cached
    assert block_digest(b"", [1, 2, 3, 4 + 2**32]) != first
    # The second block's tokens after another first block: nothing to share past the miss.
    other = make_request("b", [9, 9, 9, 9, 2**40, 6, 7, 8, 9])
    assert kv.get_computed_blocks(other) == ([], 0)


def test_prefix_hit_across_requests_shares_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_request("a", list(range(12)))
    assert admit(kv, a) == 0
    b = make_request("b", list(range(8)) + [100, 101, 102])
    blocks, num_cached = kv.get_computed_blocks(b)
    assert blocks == kv.block_table("a")[:2]
    assert num_cached == 8
    assert kv.allocate_slots(b, b.num_tokens - num_cached, blocks)
    assert kv.block_table("b")[:2] == kv.block_table("a")[:2]
    assert kv.block_table("b")[2] != kv.block_table("a")[2]
    assert [kv.blocks[x].ref_count for x in kv.block_table("a")] == [2, 2, 1]
    assert kv.prefix_cache_queries == 12 + 11
    assert kv.prefix_cache_hits == 8
    kv.check_invariants(["a", "b"])


def test_the_last_token_is_never_a_hit():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    admit(kv, make_request("a", list(range(8))))
    blocks, num_cached = kv.get_computed_blocks(make_request("b", list(range(8))))
    # Both blocks are cached, but the model must still run on token 7 to get logits.
    assert num_cached == 4 and len(blocks) == 1
    _, num_cached = kv.get_computed_blocks(make_request("c", list(range(9))))
    assert num_cached == 8


def test_hash_is_chained_over_the_prefix():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    b = make_request("b", [0, 0, 0, 0, 5, 6, 7, 8, 9])
    admit(kv, a)
    # b's second block has a's tokens but follows another block: its KV differs, no sharing.
    assert admit(kv, b) == 0
    c = make_request("c", [0, 0, 0, 0, 5, 6, 7, 8, 9])
    assert kv.get_computed_blocks(c) == (kv.block_table("b")[:2], 8)


def test_finished_request_blocks_are_reused_by_a_later_identical_prompt():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(10)))
    admit(kv, a)
    table_a = list(kv.block_table("a"))
    kv.free(a)
    assert kv.num_free_blocks == 8
    assert kv.num_cached_blocks == 2  # the two full blocks stay findable
    b = make_request("b", list(range(10)))
    assert admit(kv, b) == 8
    assert kv.block_table("b")[:2] == table_a[:2]
    kv.check_invariants(["b"])


def test_generated_tokens_are_cached_once_their_block_is_full():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", [1, 2, 3, 4, 5, 6])
    admit(kv, a)
    assert kv.num_cached_blocks == 1
    for token in (7, 8, 9):  # decode: the engine appends, the next step computes it
        a.output_token_ids.append(token)
        assert kv.allocate_slots(a, 1)
        a.num_computed_tokens += 1
        kv.cache_blocks(a, a.num_computed_tokens)
    assert kv.num_cached_blocks == 2  # tokens 5..8 filled the second block
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert kv.get_computed_blocks(b) == (kv.block_table("a")[:2], 8)


def test_lru_evicts_least_recently_freed_and_tail_blocks_first():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = make_request("a", list(range(0, 9)))  # 2 full cached blocks + 1 partial
    b = make_request("b", list(range(100, 109)))
    admit(kv, a)
    admit(kv, b)
    a_full = kv.block_table("a")[:2]
    b_full = kv.block_table("b")[:2]
    kv.free(a)
    kv.free(b)
    assert kv.num_cached_blocks == 4
    # Uncached (partial) blocks are handed out first, then a's tail block, then a's head...
    c = make_request("c", list(range(200, 208)))
    assert kv.allocate_slots(c, 8)
    assert kv.num_cached_blocks == 4  # the two uncached blocks were enough
    d = make_request("d", list(range(300, 304)))
    assert kv.allocate_slots(d, 4)
    assert kv.block_table("d") == [a_full[1]]
    assert kv.get_computed_blocks(make_request("x", list(range(9))))[1] == 4
    assert kv.get_computed_blocks(make_request("y", list(range(100, 109))))[1] == 8
    e = make_request("e", list(range(400, 408)))
    assert kv.allocate_slots(e, 8)
    assert kv.block_table("e") == [a_full[0], b_full[1]]
    assert kv.get_computed_blocks(make_request("y2", list(range(100, 109))))[1] == 4
    kv.check_invariants(["c", "d", "e"])


def test_reusing_a_cached_block_moves_it_out_of_the_lru():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(9)))
    admit(kv, a)
    kv.free(a)
    b = make_request("b", list(range(9)))
    assert admit(kv, b) == 8
    # The hit blocks are referenced again: evicting for a newcomer must not touch them.
    c = make_request("c", list(range(50, 54)))
    assert kv.allocate_slots(c, 4)
    assert not set(kv.block_table("c")) & set(kv.block_table("b"))
    assert kv.num_cached_blocks == 2
    kv.check_invariants(["b", "c"])


def test_failed_allocation_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(9)))
    admit(kv, a)  # 3 blocks, 2 cached
    kv.free(a)
    before = snapshot(kv)
    # 2 hit blocks (free, cached) + 3 fresh > 4 blocks: the hits can't double as fresh blocks.
    b = make_request("b", list(range(8)) + list(range(100, 110)))
    blocks, num_cached = kv.get_computed_blocks(b)
    assert num_cached == 8
    assert not kv.allocate_slots(b, b.num_tokens - num_cached, blocks)
    assert snapshot(kv) == before
    # Growing a running request beyond the pool fails the same way.
    c = make_request("c", list(range(200, 206)))
    assert kv.allocate_slots(c, 6)
    before = snapshot(kv)
    c.num_computed_tokens = 6
    assert not kv.allocate_slots(c, 11)
    assert snapshot(kv) == before
    kv.check_invariants(["c"])


def test_concurrent_duplicate_keeps_the_first_cached_block():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(6)))
    b = make_request("b", list(range(6)))
    # Both miss (neither has computed anything yet), then both compute the same content.
    for r in (a, b):
        blocks, num_cached = kv.get_computed_blocks(r)
        assert num_cached == 0
        assert kv.allocate_slots(r, 6, blocks)
    for r in (a, b):
        r.num_computed_tokens = 6
        kv.cache_blocks(r, 6)
    first_a, first_b = kv.block_table("a")[0], kv.block_table("b")[0]
    assert kv.blocks[first_a].block_hash is not None
    assert kv.blocks[first_b].block_hash is None
    kv.check_invariants(["a", "b"])
    kv.free(b)
    kv.free(a)
    kv.check_invariants([])
    c = make_request("c", list(range(7)))
    assert kv.get_computed_blocks(c) == ([first_a], 4)


def test_prefix_caching_off():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_request("a", list(range(9)))
    admit(kv, a)
    kv.free(a)
    assert kv.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    assert kv.num_cached_blocks == 0
    assert kv.prefix_cache_queries == 0
    kv.check_invariants([])


def test_reset_prefix_cache():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(9)))
    admit(kv, a)
    kv.reset_prefix_cache()
    assert kv.num_cached_blocks == 0
    kv.check_invariants(["a"])
    assert kv.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)


def test_check_invariants_catches_a_leak():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", [1, 2, 3])
    kv.allocate_slots(a, 3)
    with pytest.raises(AssertionError):
        kv.check_invariants([])
    kv.blocks[kv.block_table("a")[0]].ref_count = 2
    with pytest.raises(AssertionError):
        kv.check_invariants(["a"])
