"""The KV-cache block pool: reference counts, block tables, prefix hashes, LRU of free blocks.

The cache is split into `num_blocks` blocks of `block_size` token slots. A request owns a block
table (block ids in token order). Full blocks are identified by a SHA-256 digest chained over
their tokens, `sha256(parent_digest + block_tokens as int64)`, so two requests with the same
prefix share the blocks of that prefix. A cryptographic digest, not Python's `hash()`: with a
64-bit non-cryptographic hash, one tenant could craft a prompt whose block collides with another
tenant's cached prefix and be served that prefix's keys and values (vLLM's CVE-2025-25183).
A freed block keeps its digest and stays findable until the pool needs a fresh block and evicts
it, least recently freed first.

Pure Python, no torch: the model runner owns the tensors; this module only hands out ids.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from kvops.worker.request import Request, token_slice


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVBlock:
    __slots__ = ("block_id", "ref_count", "block_hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        # Set once the block is full and computed and registered in the prefix cache.
        self.block_hash: bytes | None = None

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_count}, hash={self.block_hash!r})"


class KVCacheManager:
    """Hands out KV blocks to requests and keeps the prefix cache.

    Not thread-safe: the engine calls it from its step loop only.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Free blocks (ref 0), least recently freed first; an OrderedDict gives O(1) removal of
        # a cached free block that a new request reuses.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}  # block digest -> block id
        self._tables: dict[str, list[int]] = {}
        # Per request: the hashes of its full blocks computed so far. Tokens are only ever
        # appended, so the chain stays valid across preemptions; weak keys drop it with the
        # request, also for requests that were looked up but never admitted.
        self._req_hashes: weakref.WeakKeyDictionary[Request, list[bytes]] = (
            weakref.WeakKeyDictionary()
        )
        # Per request with blocks: how many of its blocks cache_blocks has handled.
        self._num_handled: dict[str, int] = {}
        # Counted in tokens, as vLLM does: queries = tokens looked up, hits = tokens found.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request references (cached free blocks included: they are evictable)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests."""
        return (self.num_blocks - len(self._free)) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def block_table(self, request_id: str) -> list[int]:
        """The request's block ids in token order (the live list: copy it to keep it)."""
        return self._tables.get(request_id, [])

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest run of cached blocks matching the request's tokens from the start.

        Returns (block ids, tokens covered). At least the last token is left out, because the
        model must run on it to produce logits. Takes no references.
        """
        if not self.enable_prefix_caching:
            return [], 0
        num_tokens = request.num_tokens
        num_candidates = (num_tokens - 1) // self.block_size
        hashes = self._block_hashes(request, num_candidates)
        blocks: list[int] = []
        for block_hash in itertools.islice(hashes, num_candidates):
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            blocks.append(block_id)
        num_hit = len(blocks) * self.block_size
        self.prefix_cache_queries += num_tokens
        self.prefix_cache_hits += num_hit
        return blocks, num_hit

    # ------------------------------------------------------------------ changes

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[int] = ()
    ) -> bool:
        """Grow the request's block table to cover its computed tokens, `new_computed_blocks`
        (prefix-cache hits, appended first) and `num_new_tokens` more.

        Returns False and changes nothing when there are not enough free blocks.
        """
        request_id = request.request_id
        table = self._tables.get(request_id, [])
        if new_computed_blocks and table:
            raise ValueError("new_computed_blocks are only valid for a request without blocks")
        num_required = cdiv(
            request.num_computed_tokens
            + len(new_computed_blocks) * self.block_size
            + num_new_tokens,
            self.block_size,
        )
        num_fresh = max(0, num_required - len(table) - len(new_computed_blocks))
        # A cached block that is free right now leaves the free pool when reused, so it cannot
        # also serve as a fresh block.
        num_reused_free = sum(1 for b in new_computed_blocks if self.blocks[b].ref_count == 0)
        if num_fresh > len(self._free) - num_reused_free:
            return False

        for block_id in new_computed_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            table.append(block_id)
        for _ in range(num_fresh):
            table.append(self._take_fresh_block())
        self._tables[request_id] = table
        if new_computed_blocks:
            # Those blocks are registered already; cache_blocks starts after them.
            self._num_handled[request_id] = len(new_computed_blocks)
        return True

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the blocks that became full now that `num_computed_tokens` are computed."""
        if not self.enable_prefix_caching:
            return
        request_id = request.request_id
        num_full = num_computed_tokens // self.block_size
        start = self._num_handled.get(request_id, 0)
        if num_full <= start:
            return
        table = self._tables[request_id]
        hashes = self._block_hashes(request, num_full)
        for i in range(start, num_full):
            block = self.blocks[table[i]]
            block_hash = hashes[i]
            # If another request computed the same content first, keep its block in the cache;
            # this duplicate stays uncached and is simply reused as a fresh block once freed.
            if block.block_hash is None and block_hash not in self._cached:
                block.block_hash = block_hash
                self._cached[block_hash] = block.block_id
        self._num_handled[request_id] = num_full

    def free(self, request: Request) -> None:
        """Drop the request's references (on finish or preemption)."""
        request_id = request.request_id
        self._num_handled.pop(request_id, None)
        table = self._tables.pop(request_id, None)
        if not table:
            return
        # Tail blocks first: they are the least likely to be shared, so they get evicted first.
        for block_id in reversed(table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    # Holds nothing reusable: hand it out before any cached block.
                    self._free.move_to_end(block_id, last=False)

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after the weights changed)."""
        for block_hash, block_id in self._cached.items():
            if self.blocks[block_id].block_hash == block_hash:
                self.blocks[block_id].block_hash = None
        self._cached.clear()

    # ------------------------------------------------------------------ internals

    def _take_fresh_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            # Evicting: its content is about to be overwritten.
            del self._cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def _block_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """The request's chained block digests, at least its first `num_blocks` (memoised)."""
        hashes = self._req_hashes.get(request)
        if hashes is None:
            hashes = self._req_hashes[request] = []
        size = self.block_size
        parent = hashes[-1] if hashes else b""
        for i in range(len(hashes), num_blocks):
            tokens = token_slice(
                request.prompt_token_ids, request.output_token_ids, i * size, (i + 1) * size
            )
            parent = block_digest(parent, tokens)
            hashes.append(parent)
        return hashes

    def check_invariants(self, live_request_ids: Iterable[str]) -> None:
        """Raise AssertionError when the pool is inconsistent (used by tests)."""
        live = set(live_request_ids)
        _check(
            set(self._tables) <= live, f"block tables of dead requests: {set(self._tables) - live}"
        )
        _check(
            set(self._num_handled) <= set(self._tables), "cache state of requests without blocks"
        )
        refs = [0] * self.num_blocks
        for request_id, table in self._tables.items():
            _check(len(set(table)) == len(table), f"block twice in the table of {request_id}")
            for block_id in table:
                refs[block_id] += 1
        for block in self.blocks:
            _check(block.ref_count == refs[block.block_id], f"wrong ref count: {block}")
            _check(
                (block.ref_count == 0) == (block.block_id in self._free),
                f"free list disagrees with ref count: {block}",
            )
            if block.block_hash is not None:
                _check(self._cached.get(block.block_hash) == block.block_id, f"unmapped {block}")
        for block_hash, block_id in self._cached.items():
            _check(self.blocks[block_id].block_hash == block_hash, f"stale hash -> {block_id}")
        _check(self.enable_prefix_caching or not self._cached, "cached blocks with caching off")
        used = sum(1 for r in refs if r > 0)
        _check(len(self._free) + used == self.num_blocks, "free + used != num_blocks")


def block_digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    """SHA-256 of the parent block's digest (empty for the first block) and the block's tokens."""
    return hashlib.sha256(parent + struct.pack(f"<{len(tokens)}q", *tokens)).digest()


def _check(condition: bool, message: str) -> None:
    # Explicit raise rather than assert, so the check still works under python -O.
    if not condition:
        raise AssertionError(message)
