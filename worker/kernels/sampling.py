"""The sampler's common case in three small kernels: temperature (or greedy), seeded Gumbel-max, logprobs.

The vocabulary is cut into chunks so that every row keeps many programs busy:
1. per chunk: the max of the raw logits, the sums of exponentials of the raw and of
   the temperature-scaled logits relative to it, and the chunk's greedy argmax;
2. per chunk (sampled rows): the log-sum-exps from (1), then the chunk's argmax of
   log_softmax(scaled) + gumbel noise, with the same counter-based hash as
   `worker.sampler.hashed_uniform`, so it picks the tokens the torch sampler picks;
3. per row: the winning chunk, and the chosen token's logprob.
Rows that need top-k, top-p, min-p, banned tokens, penalties or top logprobs use the fused filtered sampler
(`worker.kernels.filtered_sampling`). `token_logprobs` reuses (1) for prompt scoring: the log-softmax of given
tokens, the logits read once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 8192  # vocabulary entries per program
BLOCK = 2048  # entries per loop iteration


@triton.jit
def _mix64(x):
    mask = tl.full((), 0xFFFFFFFF, tl.int64)
    x = ((x >> 16) ^ x) * 0x45D9F3B & mask
    x = ((x >> 16) ^ x) * 0x45D9F3B & mask
    return (x >> 16) ^ x


@triton.jit
def _mix32(x):
    """`_mix64` on uint32 values: the products wrap modulo 2**32 instead of being masked."""
    mul = tl.full((), 0x45D9F3B, tl.uint32)
    x = ((x >> 16) ^ x) * mul
    x = ((x >> 16) ^ x) * mul
    return (x >> 16) ^ x


@triton.jit
def _stats_kernel(logits_ptr, stride_row, temp_ptr, stats_ptr, vocab, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """stats[row, chunk, :5] = (max raw m, sum exp(x - m), sum exp((x - m) / T), greedy best, its index).

    The scaled sum is taken relative to the raw maximum (the scaled one is m / T), so the chosen token's
    processed logprob is (x - m) / T - log(sum): exactly 0 for the top token at any temperature.
    """
    row = tl.program_id(0).to(tl.int64)  # offsets below can pass 2**31
    chunk = tl.program_id(1)
    temp = tl.load(temp_ptr + row)
    divisor = tl.where(temp == 0.0, 1.0, temp)
    offs = tl.arange(0, BLOCK)
    m_raw = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    s_raw = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    s_scaled, best, best_index = s_raw, m_raw, s_raw
    end = tl.minimum(vocab, (chunk + 1) * CHUNK)
    for start in range(chunk * CHUNK, end, BLOCK):
        cols = start + offs
        x = tl.load(logits_ptr + row * stride_row + cols, mask=cols < end, other=float("-inf")).to(tl.float32)
        tile_best = tl.max(x, axis=0)
        m_new = tl.maximum(m_raw, tile_best)
        s_raw = s_raw * tl.exp(m_raw - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        s_scaled = s_scaled * tl.exp((m_raw - m_new) / divisor) + tl.sum(tl.exp((x - m_new) / divisor), axis=0)
        m_raw = m_new
        best_index = tl.where(tile_best > best, (start + tl.argmax(x, axis=0)).to(tl.float32), best_index)
        best = tl.maximum(best, tile_best)
    out = stats_ptr + (row * tl.num_programs(1) + chunk) * 8
    tl.store(out + 0, m_raw)
    tl.store(out + 1, s_raw)
    tl.store(out + 2, s_scaled)
    tl.store(out + 3, best)
    tl.store(out + 4, best_index)


@triton.jit
def _log_sum_exps(stats_ptr, row, divisor, num_chunks, MAX_CHUNKS: tl.constexpr):
    """The row's raw maximum m, log-sum-exp of the raw logits, and log of sum exp((x - m) / T)."""
    chunks = tl.arange(0, MAX_CHUNKS)
    ok = chunks < num_chunks
    base = stats_ptr + (row * num_chunks + chunks) * 8
    m_raw = tl.load(base + 0, mask=ok, other=float("-inf"))
    s_raw = tl.load(base + 1, mask=ok, other=0.0)
    s_scaled = tl.load(base + 2, mask=ok, other=0.0)
    top = tl.max(m_raw, axis=0)
    lse_raw = top + tl.log(tl.sum(s_raw * tl.exp(m_raw - top), axis=0))
    log_norm = tl.log(tl.sum(s_scaled * tl.exp((m_raw - top) / divisor), axis=0))
    return top, lse_raw, log_norm


@triton.jit
def _gumbel_kernel(logits_ptr, stride_row, temp_ptr, seed_ptr, step_ptr, stats_ptr, vocab,
                   CHUNK: tl.constexpr, BLOCK: tl.constexpr, MAX_CHUNKS: tl.constexpr):
    """stats[row, chunk, 5:7] = the chunk's best log_softmax(scaled) + gumbel and its index (sampled rows)."""
    row = tl.program_id(0).to(tl.int64)  # offsets below can pass 2**31
    chunk = tl.program_id(1)
    temp = tl.load(temp_ptr + row)
    if temp == 0.0:
        return
    top, _, log_norm = _log_sum_exps(stats_ptr, row, temp, tl.num_programs(1), MAX_CHUNKS)
    seed = tl.load(seed_ptr + row)
    mask = tl.full((), 0xFFFFFFFF, tl.int64)
    high = seed >> 32
    low = _mix64(_mix64((seed & mask) ^ _mix64(high)) ^ (tl.load(step_ptr + row) & mask))
    key_high, key_low = _mix64(high ^ low).to(tl.uint32), low.to(tl.uint32)
    offs = tl.arange(0, BLOCK)
    best = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    best_index = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    end = tl.minimum(vocab, (chunk + 1) * CHUNK)
    for start in range(chunk * CHUNK, end, BLOCK):
        cols = start + offs
        x = tl.load(logits_ptr + row * stride_row + cols, mask=cols < end, other=float("-inf")).to(tl.float32)
        bits = _mix32(key_high ^ _mix32(key_low ^ _mix32(cols.to(tl.uint32) + 0x9E3779B9)))
        u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        v = ((x - top) / temp - log_norm) + -tl.log(-tl.log(u))
        tile_best = tl.max(v, axis=0)
        best_index = tl.where(tile_best > best, (start + tl.argmax(v, axis=0)).to(tl.float32), best_index)
        best = tl.maximum(best, tile_best)
    out = stats_ptr + (row * tl.num_programs(1) + chunk) * 8
    tl.store(out + 5, best)
    tl.store(out + 6, best_index)


@triton.jit
def _pick_kernel(logits_ptr, stride_row, temp_ptr, raw_ptr, stats_ptr, token_ptr, logprob_ptr, num_chunks,
                 MAX_CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # offsets below can pass 2**31
    temp = tl.load(temp_ptr + row)
    greedy = temp == 0.0
    divisor = tl.where(greedy, 1.0, temp)
    top, lse_raw, log_norm = _log_sum_exps(stats_ptr, row, divisor, num_chunks, MAX_CHUNKS)
    chunks = tl.arange(0, MAX_CHUNKS)
    ok = chunks < num_chunks
    column = tl.where(greedy, 3, 5)
    values = tl.load(stats_ptr + (row * num_chunks + chunks) * 8 + column, mask=ok, other=float("-inf"))
    winner = tl.argmax(values, axis=0)
    token = tl.load(stats_ptr + (row * num_chunks + winner) * 8 + column + 1).to(tl.int64)
    x = tl.load(logits_ptr + row * stride_row + token).to(tl.float32)
    logprob = tl.where(tl.load(raw_ptr + row) != 0, x - lse_raw, (x - top) / divisor - log_norm)
    tl.store(token_ptr + row, token)
    tl.store(logprob_ptr + row, logprob)


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                 use_raw: torch.Tensor, token_ids: torch.Tensor, logprobs: torch.Tensor) -> None:
    """Sample one token per row of `logits` [S, V] into `token_ids` [S] (int64) and `logprobs` [S] (float32).

    temperature 0 is greedy; logprobs are of the scaled distribution, or the raw one where `use_raw` is nonzero.
    """
    rows, vocab = logits.shape
    assert logits.stride(1) == 1 and vocab < 2**24  # indices travel as exact float32
    chunks = triton.cdiv(vocab, CHUNK)
    stats = torch.empty(rows, chunks, 8, device=logits.device, dtype=torch.float32)
    max_chunks = max(2, triton.next_power_of_2(chunks))
    _stats_kernel[(rows, chunks)](logits, logits.stride(0), temperature, stats, vocab, CHUNK=CHUNK, BLOCK=BLOCK,
                                  num_warps=4)
    _gumbel_kernel[(rows, chunks)](logits, logits.stride(0), temperature, seeds, steps, stats, vocab, CHUNK=CHUNK,
                                   BLOCK=BLOCK, MAX_CHUNKS=max_chunks, num_warps=4)
    _pick_kernel[(rows,)](logits, logits.stride(0), temperature, use_raw, stats, token_ids, logprobs, chunks,
                          MAX_CHUNKS=max_chunks, num_warps=1)


@triton.jit
def _target_kernel(logits_ptr, stride_row, target_ptr, stats_ptr, logprob_ptr, num_chunks, MAX_CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # offsets below can pass 2**31
    _, lse_raw, _ = _log_sum_exps(stats_ptr, row, 1.0, num_chunks, MAX_CHUNKS)
    x = tl.load(logits_ptr + row * stride_row + tl.load(target_ptr + row)).to(tl.float32)
    tl.store(logprob_ptr + row, x - lse_raw)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[row, targets[row]] in float32 ([S]) for `logits` [S, V] in any float dtype, read once
    per chunk (no float32 copy of the logits, no [S, V] output): prompt scoring's common case."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1 and targets.shape == (rows,)
    chunks = triton.cdiv(vocab, CHUNK)
    stats = torch.empty(rows, chunks, 8, device=logits.device, dtype=torch.float32)
    ones = torch.ones(rows, device=logits.device, dtype=torch.float32)
    out = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows:
        _stats_kernel[(rows, chunks)](logits, logits.stride(0), ones, stats, vocab, CHUNK=CHUNK, BLOCK=BLOCK,
                                      num_warps=4)
        _target_kernel[(rows,)](logits, logits.stride(0), targets, stats, out, chunks,
                                MAX_CHUNKS=max(2, triton.next_power_of_2(chunks)), num_warps=1)
    return out
