"""Pure-torch attention over the paged cache: the oracle, and the CPU path."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.attention.backend import AttentionBackend, AttentionMetadata


@dataclass
class _Plan:
    key_slots: torch.Tensor  # [B, S] cache slot of each context position
    key_valid: torch.Tensor  # [B, 1, S, 1] False past the sequence's end (slot contents undefined)
    mask: torch.Tensor  # [B, 1, Q, S] True where a query may see a key
    query_rows: torch.Tensor  # [B, Q] row in the flat batch (clamped)
    query_valid: torch.Tensor  # [B, Q] False on padding


class ReferenceBackend(AttentionBackend):
    """Gathers each sequence's keys into a padded [B, S] layout and runs masked softmax attention."""

    name = "reference"

    def prepare(self, meta: AttentionMetadata, block_size: int) -> None:
        device = meta.seq_lens.device
        positions = torch.arange(meta.max_seq_len, device=device)
        blocks = meta.block_tables[:, positions // block_size]
        key_slots = blocks * block_size + positions % block_size
        q_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
        q_index = torch.arange(meta.max_query_len, device=device)
        query_valid = q_index[None, :] < q_lens[:, None]
        query_pos = (meta.seq_lens - q_lens)[:, None] + q_index[None, :]
        mask = positions[None, None, :] <= query_pos[:, :, None]
        mask &= positions[None, None, :] < meta.seq_lens[:, None, None]
        mask &= query_valid[:, :, None]
        query_rows = (meta.query_start_loc[:-1, None] + q_index[None, :]).clamp(max=meta.slot_mapping.numel() - 1)
        key_valid = (positions[None, :] < meta.seq_lens[:, None])[:, None, :, None]
        meta.plan = _Plan(key_slots, key_valid, mask[:, None], query_rows, query_valid)

    def forward(self, q, k, v, kv_cache, meta, scale):
        plan: _Plan = meta.plan
        num_heads, head_dim = q.shape[1], q.shape[2]
        k_cache = kv_cache[0].view(-1, *kv_cache.shape[-2:])
        v_cache = kv_cache[1].view(-1, *kv_cache.shape[-2:])
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
        keys = k_cache[plan.key_slots].transpose(1, 2)  # [B, Hkv, S, D]
        values = v_cache[plan.key_slots].transpose(1, 2).masked_fill(~plan.key_valid, 0)
        group = num_heads // keys.shape[1]
        if group > 1:
            keys = keys.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)
        queries = q[plan.query_rows].transpose(1, 2)  # [B, H, Q, D]
        scores = torch.matmul(queries.float(), keys.float().transpose(-1, -2)) * scale
        scores = scores.masked_fill(~plan.mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out = torch.matmul(probs, values.float()).to(q.dtype).transpose(1, 2)  # [B, Q, H, D]
        return out[plan.query_valid].reshape(-1, num_heads, head_dim)
