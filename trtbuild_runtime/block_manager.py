"""Bookkeeping of the paged KV pool: which blocks a sequence owns, and which full blocks can be shared.

A block holds `page_size` tokens of every layer's K and V. With prefix caching on, a full block is
named by a hash of its tokens and of every token before it; a new sequence whose prompt starts
with the same tokens takes those blocks instead of computing them. Freed blocks keep their
contents and their name until they are handed out again, least recently freed first (LRU).
"""

from __future__ import annotations

import collections
import hashlib
import struct

from trtbuild_runtime.sequence import Sequence


def block_hash(previous: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(previous + struct.pack(f"<{len(tokens)}q", *tokens), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, page_size: int, enable_kv_cache_reuse: bool = False):
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self.num_blocks = num_blocks
        self.page_size = page_size
        self.prefix_caching = enable_kv_cache_reuse
        self.ref_count = [0] * num_blocks
        self.free: collections.OrderedDict[int, None] = collections.OrderedDict((b, None) for b in range(num_blocks))
        self.hash_of: dict[int, bytes] = {}  # block -> name, for full blocks
        self.block_of: dict[bytes, int] = {}  # name -> block
        self.hits = 0  # prompt tokens served from the cache
        self.queries = 0  # prompt tokens looked up

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _take(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def _fresh(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.hash_of.pop(block, None)
        if old is not None and self.block_of.get(old) == block:
            del self.block_of[old]
        self.ref_count[block] = 1
        return block

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached run of the sequence's full blocks (all but its last token)."""
        if not self.prefix_caching:
            return []
        found, previous = [], b""
        full = (len(seq) - 1) // self.page_size  # the last token is always computed: it yields the logits
        for i in range(full):
            previous = block_hash(previous, seq.tokens[i * self.page_size:(i + 1) * self.page_size])
            block = self.block_of.get(previous)
            if block is None:
                break
            found.append(block)
        return found

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `num_tokens` tokens of KV (from its start) can be given to a sequence that has none."""
        cached = self._cached_prefix(seq)
        reusable_free = sum(1 for b in cached if self.ref_count[b] == 0)
        needed = self.blocks_needed(num_tokens) - len(cached)
        return max(needed, 0) + reusable_free <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence its cached prefix; the rest is grown by `ensure` as it is computed."""
        assert not seq.block_table
        cached = self._cached_prefix(seq)
        for block in cached:
            self._take(block)
        seq.block_table = cached
        seq.num_computed = seq.num_cached = len(cached) * self.page_size
        if self.prefix_caching:
            self.queries += len(seq) - 1
            self.hits += seq.num_cached

    def can_ensure(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free

    def ensure(self, seq: Sequence, num_tokens: int) -> None:
        """Enough blocks for the first `num_tokens` tokens of the sequence."""
        while len(seq.block_table) < self.blocks_needed(num_tokens):
            seq.block_table.append(self._fresh())

    def publish(self, seq: Sequence) -> None:
        """Name the sequence's full, computed blocks so later prompts can share them."""
        if not self.prefix_caching:
            return
        previous = b""
        for i in range(seq.num_computed // self.page_size):
            block = seq.block_table[i]
            name = self.hash_of.get(block)
            if name is None:
                name = block_hash(previous, seq.tokens[i * self.page_size:(i + 1) * self.page_size])
                self.hash_of[block] = name
                self.block_of.setdefault(name, block)
            previous = name

    def release(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
                if block not in self.hash_of:
                    self.free.move_to_end(block, last=False)  # nameless blocks are reused first
        seq.block_table = []
        seq.num_computed = 0  # num_cached keeps what the last admission found, for the output

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
