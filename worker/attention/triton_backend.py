"""The CUDA attention backend: Triton kernels over the paged cache.

Steps where every sequence computes one token run the split-KV decode kernel
(the shape CUDA graphs replay); other steps (prefill, chunked prefill, mixed)
run the varlen kernel, which also reads each sequence's cached prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from worker.attention.backend import AttentionBackend, AttentionMetadata
from worker.kernels.attention import (decode_splits, paged_decode_attention, paged_varlen_attention, store_kv,
                                      varlen_tile_rows)


@dataclass
class _Plan:
    decode: bool
    tile_starts: Optional[torch.Tensor]  # [B + 1] cumulative varlen tiles (prefill / mixed steps)


class TritonBackend(AttentionBackend):
    """Grouped-query Triton kernels; K/V of the step are written to the cache by one fused kernel."""

    name = "triton"

    def __init__(self, device: torch.device):
        cuda = device.type == "cuda"
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 1

    def prepare(self, meta: AttentionMetadata, block_size: int) -> None:
        meta.plan = _Plan(decode=meta.max_query_len == 1, tile_starts=None)

    def forward(self, q, k, v, kv_cache, meta, scale):
        plan: _Plan = meta.plan
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        if plan.decode:
            splits = decode_splits(q.shape[0], k_cache.shape[2], self.num_sms)
            return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, out, splits)
        if plan.tile_starts is None:  # the first layer computes it; every layer has the same heads
            plan.tile_starts = _tile_starts(meta.query_start_loc, varlen_tile_rows(q.shape[1], k_cache.shape[2]))
        return paged_varlen_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                      plan.tile_starts, scale, out)


def _tile_starts(query_start_loc: torch.Tensor, rows: int) -> torch.Tensor:
    """Exclusive cumulative count of `rows`-token tiles per sequence, [B + 1]."""
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    tiles = (q_lens + rows - 1) // rows
    return torch.cat([tiles.new_zeros(1), tiles.cumsum(0)])
