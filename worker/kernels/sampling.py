"""The sampler's common case in one kernel: temperature (or greedy), seeded Gumbel-max, logprobs.

Per row it streams the logits twice: once for the log-sum-exps of the raw and
the temperature-scaled distributions (and the greedy argmax), once for
argmax(log_softmax(scaled) + gumbel) with the same counter-based hash noise as
`worker.sampler.hashed_uniform`, so it picks the tokens the torch sampler picks.
Rows that need top-k, top-p, min-p, banned tokens or top logprobs use the torch
sampler instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mix(x):
    mask = tl.full((), 0xFFFFFFFF, tl.int64)
    x = ((x >> 16) ^ x) * 0x45D9F3B & mask
    x = ((x >> 16) ^ x) * 0x45D9F3B & mask
    return (x >> 16) ^ x


@triton.jit
def _sample_kernel(logits_ptr, stride_row, temp_ptr, seed_ptr, step_ptr, raw_ptr, token_ptr, logprob_ptr, vocab,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row * stride_row
    temp = tl.load(temp_ptr + row)
    greedy = temp == 0.0
    divisor = tl.where(greedy, 1.0, temp)
    offs = tl.arange(0, BLOCK)
    m_raw = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    s_raw = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    m_scaled, s_scaled, best = m_raw, s_raw, m_raw
    best_index = tl.sum(tl.zeros([BLOCK], tl.int64), axis=0)
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        y = x / divisor
        m_new = tl.maximum(m_raw, tl.max(x, axis=0))
        s_raw = s_raw * tl.exp(m_raw - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m_raw = m_new
        tile_best = tl.max(y, axis=0)
        m_new = tl.maximum(m_scaled, tile_best)
        s_scaled = s_scaled * tl.exp(m_scaled - m_new) + tl.sum(tl.exp(y - m_new), axis=0)
        m_scaled = m_new
        best_index = tl.where(tile_best > best, start + tl.argmax(y, axis=0), best_index)
        best = tl.maximum(best, tile_best)
    lse_raw = m_raw + tl.log(s_raw)
    lse_scaled = m_scaled + tl.log(s_scaled)
    if not greedy:
        seed = tl.load(seed_ptr + row)
        mask = tl.full((), 0xFFFFFFFF, tl.int64)
        key = _mix(_mix((seed & mask) ^ _mix(seed >> 32)) ^ (tl.load(step_ptr + row) & mask))
        best = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
        for start in range(0, vocab, BLOCK):
            cols = start + offs
            x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            bits = _mix(key ^ _mix((cols.to(tl.int64) + 0x9E3779B9) & mask))
            u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
            v = (x / divisor - lse_scaled) + -tl.log(-tl.log(u))
            tile_best = tl.max(v, axis=0)
            best_index = tl.where(tile_best > best, start + tl.argmax(v, axis=0), best_index)
            best = tl.maximum(best, tile_best)
    x = tl.load(row_ptr + best_index).to(tl.float32)
    logprob = tl.where(tl.load(raw_ptr + row) != 0, x - lse_raw, x / divisor - lse_scaled)
    tl.store(token_ptr + row, best_index)
    tl.store(logprob_ptr + row, logprob)


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                 use_raw: torch.Tensor, token_ids: torch.Tensor, logprobs: torch.Tensor) -> None:
    """Sample one token per row of `logits` [S, V] into `token_ids` [S] (int64) and `logprobs` [S] (float32).

    temperature 0 is greedy; logprobs are of the scaled distribution, or the raw one where `use_raw` is nonzero.
    """
    rows, vocab = logits.shape
    assert logits.stride(1) == 1
    _sample_kernel[(rows,)](logits, logits.stride(0), temperature, seeds, steps, use_raw, token_ids, logprobs,
                            vocab, BLOCK=2048, num_warps=8)
