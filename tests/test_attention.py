"""The reference paged backend against dense causal attention on contiguous tensors."""

import pytest
import torch
import torch.nn.functional as F

from worker.attention import AttentionMetadata
from worker.attention.reference import ReferenceBackend


def paged_case(seq_lens, q_lens, num_heads, num_kv_heads, head_dim=16, block_size=4, num_blocks=64, seed=0):
    """Random K/V for whole sequences scattered over random blocks; the last q_len tokens are this step's."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    tables, slots, qs, new_k, new_v, dense = [], [], [], [], [], []
    for seq_len, q_len in zip(seq_lens, q_lens):
        blocks = [perm.pop() for _ in range(-(-seq_len // block_size))]
        tables.append(blocks)
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        q = torch.randn(q_len, num_heads, head_dim, generator=gen)
        slot = [blocks[p // block_size] * block_size + p % block_size for p in range(seq_len)]
        flat = cache.view(2, -1, num_kv_heads, head_dim)
        old = torch.tensor(slot[: seq_len - q_len], dtype=torch.long)
        flat[0, old], flat[1, old] = k[: seq_len - q_len], v[: seq_len - q_len]
        slots += slot[seq_len - q_len :]
        qs.append(q), new_k.append(k[seq_len - q_len :]), new_v.append(v[seq_len - q_len :])
        dense.append(dense_attention(q, k, v, num_heads // num_kv_heads))
    width = max(map(len, tables))
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist()),
        seq_lens=torch.tensor(seq_lens),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        slot_mapping=torch.tensor(slots),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
    )
    return torch.cat(qs), torch.cat(new_k), torch.cat(new_v), cache, meta, torch.cat(dense)


def dense_attention(q, k, v, group):
    """Causal attention of the last len(q) positions over all of k/v, with torch's SDPA."""
    q_len, seq_len = q.shape[0], k.shape[0]
    mask = torch.arange(seq_len)[None, :] <= torch.arange(seq_len - q_len, seq_len)[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(group, 1).transpose(0, 1), v.repeat_interleave(group, 1).transpose(0, 1),
        attn_mask=mask,
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 2), (7, 1), (8, 1)])
def test_reference_backend_matches_dense_attention(num_heads, num_kv_heads):
    seq_lens, q_lens = [1, 13, 37, 6, 20], [1, 13, 1, 3, 20]  # decode, prefill, decode, chunk, prefill
    q, k, v, cache, meta, expected = paged_case(seq_lens, q_lens, num_heads, num_kv_heads, seed=num_heads)
    backend = ReferenceBackend()
    backend.prepare(meta, block_size=4)
    out = backend.forward(q, k, v, cache, meta, scale=16**-0.5)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    written = cache.view(2, -1, num_kv_heads, 16)[:, meta.slot_mapping]
    torch.testing.assert_close(written[0], k) and torch.testing.assert_close(written[1], v)
