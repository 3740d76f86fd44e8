"""The seam between the model and an attention implementation.

A step's tokens are flattened: sequence b owns query rows
`query_start_loc[b]:query_start_loc[b+1]`, which are the last tokens of its
`seq_lens[b]`-token context. Keys and values of every context token live in the
paged cache; `slot_mapping` says where this step's new tokens are written.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """Per-step layout of the batch, shared by every layer."""

    query_start_loc: torch.Tensor  # [B + 1] int64, cumulative query lengths
    seq_lens: torch.Tensor  # [B] int64, context length including this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks] int64, block ids (padding 0)
    slot_mapping: torch.Tensor  # [T] int64, cache slot of each new token
    max_query_len: int
    max_seq_len: int
    plan: Any = field(default=None)  # backend-specific tensors derived once per step


class AttentionBackend(ABC):
    """An attention implementation over a paged cache of shape
    [2, num_blocks, block_size, num_kv_heads, head_dim] per layer."""

    name: str

    def prepare(self, meta: AttentionMetadata, block_size: int) -> None:
        """Derive per-step tensors once (stored in `meta.plan`) before the layers run."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Write k/v [T, Hkv, D] into the cache, then attend q [T, H, D]; returns [T, H, D]."""
