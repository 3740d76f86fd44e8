"""Paged KV-cache blocks: allocation, reference counts, and the prefix cache.

A full block is identified by a chained hash of its tokens and every token
before it. Blocks whose tokens are computed are registered under that hash, so
a later sequence with the same prefix (another request, or another sample of
the same prompt) shares them instead of recomputing. Freed blocks keep their
hash and stay findable until they are handed out again (least recently freed
first). With prefix caching off, only blocks still in use are shared, and the
full prompt blocks of a finished sample while other samples of its prompt wait.

Routed experts: a block completed by a sample that records them keeps a copy of its
rows; a sample that records them matches only blocks that have rows (the rest of its
prefix is recomputed), and takes the rows of the blocks it matched.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np

from rollout.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: Optional[int] = None
    token_ids: tuple[int, ...] = ()
    routes: Optional[np.ndarray] = None  # routed experts of its tokens [block_size, layers, top_k], if recorded


def chain_hash(prev: int, token_ids: tuple[int, ...]) -> int:
    return hash((prev, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self.num_hit_blocks = 0  # blocks reused from the prefix cache so far
        self.epoch = 0  # roots every hash chain; a reset starts a new one

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of the sequence (always leaving one token to compute)."""
        hits, prev = [], self.epoch
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            prev = chain_hash(prev, tokens)
            block_id = self.cached.get(prev)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != tokens or (seq.routes is not None and block.routes is None):
                break
            hits.append(block_id)
        return hits

    def num_prompt_blocks(self, seq: Sequence) -> int:
        """Full blocks of the sequence's prompt that other samples of the prompt share (all but the block of
        the prompt's last token, which each sample computes itself to sample its first token)."""
        return (seq.prompt_len - 1) // self.block_size

    def blocks_needed(self, seq: Sequence, num_new: int, hits: list[int] = ()) -> int:
        """Free blocks that scheduling `num_new` more tokens takes (cached hits that are free count too)."""
        have = len(seq.block_table) or len(hits)
        computed = seq.num_computed if seq.block_table else len(hits) * self.block_size
        new = max(0, -(-(computed + num_new) // self.block_size) - have)
        return new + sum(1 for b in hits if self.blocks[b].ref_count == 0)

    def allocate(self, seq: Sequence, num_new: int, hits: list[int] = ()) -> None:
        """Give the sequence blocks for `num_new` more tokens; a new sequence first takes its prefix hits."""
        if not seq.block_table:
            seq.cache_epoch = self.epoch
        if not seq.block_table and hits:
            for block_id in hits:
                self._take(block_id)
            seq.block_table = list(hits)
            seq.block_hashes = [self.blocks[b].hash for b in hits]
            seq.num_computed = len(hits) * self.block_size
            self.num_hit_blocks += len(hits)
            if seq.routes is not None:
                for i, block_id in enumerate(hits):
                    seq.routes.put(i * self.block_size, self.blocks[block_id].routes)
        total = -(-(seq.num_computed + num_new) // self.block_size)
        while len(seq.block_table) < total:
            block_id = next(iter(self.free_ids))
            self._forget(self.blocks[block_id])
            self._take(block_id)
            seq.block_table.append(block_id)

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_ids[block_id]
        block.ref_count += 1

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's newly completed blocks in the prefix cache."""
        full = seq.num_computed // self.block_size
        for i in range(len(seq.block_hashes), full):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            prev = seq.block_hashes[-1] if seq.block_hashes else seq.cache_epoch
            h = chain_hash(prev, tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = h, tokens
            block.routes = None if seq.routes is None else seq.routes.block(i, self.block_size)
            self.cached.setdefault(h, block.block_id)

    def free(self, seq: Sequence, keep_prompt: bool = False) -> None:
        """Drop the sequence's references; blocks no one uses go back to the free list (tail first).

        With prefix caching off they are forgotten, except that `keep_prompt` keeps the full prompt blocks
        findable (until handed out again) for samples of the same prompt still to be admitted.
        """
        kept = self.num_prompt_blocks(seq) if keep_prompt else 0
        for i in reversed(range(len(seq.block_table))):
            block = self.blocks[seq.block_table[i]]
            block.ref_count -= 1
            if block.ref_count == 0:
                if not self.enable_prefix_caching and i >= kept:
                    self._forget(block)
                self.free_ids[block.block_id] = None
        seq.block_table, seq.block_hashes, seq.num_computed = [], [], 0

    def _forget(self, block: Block) -> None:
        if block.hash is not None and self.cached.get(block.hash) == block.block_id:
            del self.cached[block.hash]
        block.hash, block.token_ids, block.routes = None, (), None

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (after a weight change their KV is stale).

        Sequences still running keep chaining from the old epoch, so blocks they
        complete later (partly computed with the old weights) are never matched.
        """
        self.epoch += 1
        for block in self.blocks:
            block.hash, block.token_ids, block.routes = None, (), None
        self.cached.clear()
