"""The fused sampler for every setting: top-k, top-p, min-p, banned tokens, top logprobs, per row.

Every pass over the vocabulary is split across many programs per row (chunks of CHUNK tokens), and
there is no sort, no host sync and no data-dependent shape (CUDA-graph safe):
1. stats per chunk, combined per row: the maximum m and sum of e = exp(s - m) of the scaled logits
   s = x / T, the greedy token, the count and smallest key of the finite s, the raw log-sum-exp;
2. top-k keeps the first k tokens of the rank order (s descending, then token id ascending), top-p
   (on what top-k kept) the first tokens whose mass before them is below top_p. Both are a prefix of
   the rank order: the tokens above a threshold key t plus the first `ties` tokens (by id) at t,
   found by the threshold search of `worker.kernels.threshold_search` (chunk-parallel bucket passes,
   then a short search over the few candidates left); the id of the last tie kept is looked up once;
3. min-p: tokens with probability below min_p * (the largest) leave; count and mass of what stays
   (per chunk);
4. Gumbel-max over the kept tokens per chunk with the counter-based hash of
   `worker.sampler.hashed_uniform` (the torch sampler's random numbers), then the winner per row;
5. top logprobs (`worker.kernels.top_logprobs`): the K-th key of the rank order by the same search,
   every chunk's tokens above it and first ties at it, ranked per row.
This is `worker.sampler.torch_sample`'s distribution: the same tokens for the same seeds, the same
logprobs up to float32 rounding (sums are taken in another order, so a token within rounding of a
filter boundary may fall on the other side).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels.sampling import _mix32, _mix64
from worker.kernels.row_results import (COUNT, CUTOFF, FINITE, GREEDY, KEPT, KEPT_MASS, LOG_Z, LOW, LSE_RAW, M,
                                        MATTER, ON_K, T, TIES, Z)
from worker.kernels.threshold_search import (BLOCK, CAP, CHUNK, NB, ROW_BLOCK, STATES, VALUE_PASSES, _init_search,
                                             _key, _scaled, _value, finish_search, nth_at, run_passes)
from worker.kernels.top_logprobs import top_logprobs as rank_top_logprobs

MAX_TOP_LOGPROBS = 64


@triton.jit
def _online(m, z, x):
    """Per lane: the running max m and sum z of exp(. - m) with the values x added (-inf values add nothing)."""
    m_new = tl.maximum(m, x)
    shift = tl.where(m_new > float("-inf"), m_new, 0.0)  # (no -inf - -inf)
    return m_new, z * tl.exp(m - shift) + tl.exp(x - shift)


@triton.jit
def _merged(m, z):
    """The chunk's max and sum of exp(. - max) from the lanes' running ones."""
    top = tl.max(m, axis=0)
    return top, tl.sum(z * tl.exp(m - tl.where(top > float("-inf"), top, 0.0)), axis=0)


@triton.jit
def _stats_kernel(work_ptr, stride_work, raw_ptr, stride_raw, vocab, temp_ptr, cf, ci,
                  SEPARATE_RAW: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Per chunk, of s: max, sum exp(s - max), first argmax, finite count, smallest finite key; of the raw
    logits: max, sum exp(x - max), smallest key. Each lane keeps its own running values; they are reduced
    once at the end."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    temp = tl.load(temp_ptr + row)
    divisor = tl.where(temp == 0.0, 1.0, temp)
    work, raw = work_ptr + row * stride_work, raw_ptr + row * stride_raw
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    z = tl.zeros([BLOCK], tl.float32)
    m_raw, z_raw = m, z
    best_index = tl.zeros([BLOCK], tl.int32)
    finite = best_index
    low = tl.full([BLOCK], 2147483647, tl.int32)
    low_raw = low
    end = tl.minimum(vocab, (chunk + 1) * CHUNK)
    for start in range(chunk * CHUNK, end, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < end
        s = _scaled(work, cols, ok, divisor)
        if SEPARATE_RAW:
            x = tl.load(raw + cols, mask=ok, other=float("-inf")).to(tl.float32)
        else:
            x = tl.load(work + cols, mask=ok, other=float("-inf")).to(tl.float32)
        best_index = tl.where(s > m, cols, best_index)  # each lane's first argmax
        m, z = _online(m, z, s)
        m_raw, z_raw = _online(m_raw, z_raw, x)
        is_finite = s > float("-inf")
        finite += is_finite.to(tl.int32)
        low = tl.minimum(low, tl.where(is_finite, _key(s), 2147483647))
        low_raw = tl.minimum(low_raw, tl.where(ok, _key(tl.where(x == 0.0, 0.0, x)), 2147483647))
    top, z = _merged(m, z)
    top_raw, z_raw = _merged(m_raw, z_raw)
    first = tl.min(tl.where(m == top, best_index, 2147483647), axis=0)
    out = (row * tl.num_programs(1) + chunk) * 4
    tl.store(cf + out, top)
    tl.store(cf + out + 1, z)
    tl.store(cf + out + 2, top_raw)
    tl.store(cf + out + 3, z_raw)
    tl.store(ci + out, tl.where(top > float("-inf"), first, chunk * CHUNK))
    tl.store(ci + out + 1, tl.sum(finite, axis=0))
    tl.store(ci + out + 2, tl.min(low, axis=0))
    tl.store(ci + out + 3, tl.min(low_raw, axis=0))


@triton.jit
def _setup_kernel(cf, ci, num_chunks, temp_ptr, top_k_ptr, raw_mode_ptr, rf, ri,
                  k_si, k_sf, l_si, l_sf, K: tl.constexpr, MAX_CHUNKS: tl.constexpr, STATES: tl.constexpr):
    """The row's stats from its chunks'; the default (unfiltered) results; state 0 of the top-k and
    top-logprobs searches."""
    row = tl.program_id(0).to(tl.int64)
    chunks = tl.arange(0, MAX_CHUNKS)
    ok = chunks < num_chunks
    base = (row * num_chunks + chunks) * 4
    m_c = tl.load(cf + base, mask=ok, other=float("-inf"))
    m = tl.max(m_c, axis=0)
    z = tl.sum(tl.where(m_c > float("-inf"), tl.load(cf + base + 1, mask=ok, other=0.0) * tl.exp(m_c - m), 0.0),
               axis=0)
    mr_c = tl.load(cf + base + 2, mask=ok, other=float("-inf"))
    m_raw = tl.max(mr_c, axis=0)
    lse_raw = m_raw + tl.log(tl.sum(tl.where(mr_c > float("-inf"), tl.load(cf + base + 3, mask=ok, other=0.0)
                                             * tl.exp(mr_c - m_raw), 0.0), axis=0))
    first = tl.min(tl.where(ok & (m_c == m), chunks, MAX_CHUNKS), axis=0)
    greedy = tl.load(ci + (row * num_chunks + first) * 4)
    finite = tl.sum(tl.load(ci + base + 1, mask=ok, other=0), axis=0)
    low = tl.min(tl.load(ci + base + 2, mask=ok, other=2147483647), axis=0)
    temp = tl.load(temp_ptr + row)
    use_raw = tl.load(raw_mode_ptr + row) != 0
    matter = (temp != 0.0) | (~use_raw)  # the filters matter: sampled, or processed logprobs
    bottom = _key(tl.full((), float("-inf"), tl.float32))
    rfo, rio = rf + row * 8, ri + row * 16
    tl.store(rfo + M, m)
    tl.store(rfo + Z, z)
    tl.store(rfo + LSE_RAW, lse_raw)
    tl.store(rfo + KEPT_MASS, z)
    tl.store(rio + GREEDY, greedy)
    tl.store(rio + FINITE, finite)
    tl.store(rio + LOW, low)
    tl.store(rio + T, bottom)
    tl.store(rio + TIES, finite * 0)
    tl.store(rio + KEPT, finite)
    tl.store(rio + CUTOFF, finite * 0 - 1)
    tl.store(rio + ON_K, finite * 0)
    tl.store(rio + MATTER, matter.to(tl.int32))
    top_k = tl.load(top_k_ptr + row)
    _init_search(k_si, k_sf, row, (matter & (top_k < finite)).to(tl.int32), low, _key(m), top_k.to(tl.float32), 0,
                 bottom, 0, 1.0, m, STATES)
    if K > 0:
        low_raw = tl.min(tl.load(ci + base + 3, mask=ok, other=2147483647), axis=0)
        lo = tl.where(use_raw, low_raw, tl.where(finite >= K, low, bottom))
        _init_search(l_si, l_sf, row, 1, lo, tl.where(use_raw, _key(lse_raw), _key(m)), K * 1.0, 0, lo,
                     use_raw.to(tl.int32), 1.0, tl.where(use_raw, lse_raw, m), STATES)


@triton.jit
def _topk_done_kernel(work_ptr, stride_work, vocab, temp_ptr, top_p_ptr, rf, ri, k_si, k_sf, cand_s, cand_id,
                      p_si, p_sf, STATES: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr,
                      VALUE_PASSES: tl.constexpr):
    """Finish the top-k search: what top-k keeps; state 0 of the top-p search over it."""
    row = tl.program_id(0).to(tl.int64)
    work = work_ptr + row * stride_work
    temp = tl.load(temp_ptr + row)
    divisor = tl.where(temp == 0.0, 1.0, temp)
    rfo, rio = rf + row * 8, ri + row * 16
    m, kept_mass = tl.load(rfo + M), tl.load(rfo + KEPT_MASS)
    t, kept, low = tl.load(rio + T), tl.load(rio + KEPT), tl.load(rio + LOW)
    tie_scale = m * 0.0 + 1.0
    on_k = tl.load(k_si + row * STATES * 8) != 0
    if on_k:
        top_k = tl.load(k_sf + row * STATES * 4 + 1).to(tl.int32)
        t, above, above_mass, at_count, _ = finish_search(work, work, vocab, divisor, k_si, k_sf, cand_s, row,
                                                          STATES, CAP, BLOCK, NB, VALUE_PASSES)
        ties = top_k - above
        kept = top_k
        kept_mass = above_mass + ties.to(tl.float32) * tl.exp(_value(t) - m)
        tie_scale = ties.to(tl.float32) / at_count.to(tl.float32)
        tl.store(rfo + KEPT_MASS, kept_mass)
        tl.store(rio + T, t)
        tl.store(rio + TIES, ties)
        tl.store(rio + KEPT, kept)
        tl.store(rio + ON_K, t * 0 + 1)
        tl.store(rio + CUTOFF, nth_at(work, vocab, divisor, cand_s, cand_id, k_si, row, t, ties, STATES, CAP, BLOCK))
    top_p = tl.load(top_p_ptr + row)
    _init_search(p_si, p_sf, row, ((tl.load(rio + MATTER) != 0) & (top_p < 1.0)).to(tl.int32),
                 tl.where(on_k, t, low), _key(m), top_p * kept_mass, 1, t, 0, tie_scale, m, STATES)


@triton.jit
def _topp_done_kernel(work_ptr, stride_work, vocab, temp_ptr, rf, ri, p_si, p_sf, cand_s, cand_id,
                      STATES: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr,
                      VALUE_PASSES: tl.constexpr):
    """Finish the top-p search: the nucleus of what top-k kept (the i-th token tied at the threshold, from 0,
    stays while the mass before it is below the target)."""
    row = tl.program_id(0).to(tl.int64)
    if tl.load(p_si + row * STATES * 8) != 0:
        work = work_ptr + row * stride_work
        temp = tl.load(temp_ptr + row)
        divisor = tl.where(temp == 0.0, 1.0, temp)
        rfo, rio = rf + row * 8, ri + row * 16
        m, target = tl.load(rfo + M), tl.load(p_sf + row * STATES * 4 + 1)
        tp, above, above_mass, at_count, _ = finish_search(work, work, vocab, divisor, p_si, p_sf, cand_s, row,
                                                           STATES, CAP, BLOCK, NB, VALUE_PASSES)
        count = tl.where((tl.load(rio + ON_K) != 0) & (tp == tl.load(rio + T)), tl.load(rio + TIES), at_count)
        e = tl.exp(_value(tp) - m)
        room = tl.maximum(tl.ceil((target - above_mass) / e), 1.0)
        ties = tl.where(e > 0.0, tl.minimum(count.to(tl.float32), room).to(tl.int32), count)
        tl.store(rfo + KEPT_MASS, above_mass + ties.to(tl.float32) * e)
        tl.store(rio + T, tp)
        tl.store(rio + TIES, ties)
        tl.store(rio + KEPT, above + ties)
        tl.store(rio + CUTOFF, nth_at(work, vocab, divisor, cand_s, cand_id, p_si, row, tp, ties, STATES, CAP,
                                      BLOCK))


@triton.jit
def _kept(s, cols, m, t, cutoff, kept_mass, min_p):
    """Whether tokens survive top-k, top-p (keys above t, or at t up to id `cutoff`) and min-p
    (as torch: probs = e / Z < max(probs) * min_p, with max(probs) = 1 / Z)."""
    k = _key(s)
    prefix = (k > t) | ((k == t) & (cols <= cutoff))
    return prefix & (tl.exp(s - m) / kept_mass >= (1.0 / kept_mass) * min_p)


@triton.jit
def _min_p_kernel(work_ptr, stride_work, vocab, temp_ptr, min_p_ptr, rf, ri, mp, CHUNK: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Per chunk (rows with min-p): count and mass of the tokens every filter keeps."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    rfo, rio = rf + row * 8, ri + row * 16
    min_p = tl.where(tl.load(rio + MATTER) != 0, tl.load(min_p_ptr + row), 0.0)
    if min_p > 0.0:
        temp = tl.load(temp_ptr + row)
        divisor = tl.where(temp == 0.0, 1.0, temp)
        m, kept_mass = tl.load(rfo + M), tl.load(rfo + KEPT_MASS)
        t, cutoff = tl.load(rio + T), tl.load(rio + CUTOFF)
        count = tl.zeros([BLOCK], tl.int32)  # per lane, reduced once at the end
        mass = tl.zeros([BLOCK], tl.float32)
        end = tl.minimum(vocab, (chunk + 1) * CHUNK)
        for start in range(chunk * CHUNK, end, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            s = _scaled(work_ptr + row * stride_work, cols, cols < end, divisor)
            keep = _kept(s, cols, m, t, cutoff, kept_mass, min_p) & (cols < end)
            count += keep.to(tl.int32)
            mass += tl.where(keep, tl.exp(s - m), 0.0)
        out = (row * tl.num_programs(1) + chunk) * 2
        tl.store(mp + out, tl.sum(count, axis=0).to(tl.float32))
        tl.store(mp + out + 1, tl.sum(mass, axis=0))


@triton.jit
def _log_norm(rf, ri, mp, min_p_ptr, row, num_chunks, MAX_CHUNKS: tl.constexpr):
    """The row's log of the kept mass (after min-p) and the count of kept tokens."""
    rio = ri + row * 16
    min_p = tl.where(tl.load(rio + MATTER) != 0, tl.load(min_p_ptr + row), 0.0)
    chunks = tl.arange(0, MAX_CHUNKS)
    ok = (chunks < num_chunks) & (tl.full([MAX_CHUNKS], 0.0, tl.float32) < min_p)
    count = tl.sum(tl.load(mp + (row * num_chunks + chunks) * 2, mask=ok, other=0.0), axis=0).to(tl.int32)
    mass = tl.sum(tl.load(mp + (row * num_chunks + chunks) * 2 + 1, mask=ok, other=0.0), axis=0)
    count = tl.where(min_p > 0.0, count, tl.load(rio + KEPT))
    return tl.log(tl.where(min_p > 0.0, mass, tl.load(rf + row * 8 + KEPT_MASS))), count, min_p


@triton.jit
def _gumbel_kernel(work_ptr, stride_work, vocab, temp_ptr, min_p_ptr, seed_ptr, step_ptr, rf, ri, mp, gb, gi,
                   CHUNK: tl.constexpr, BLOCK: tl.constexpr, MAX_CHUNKS: tl.constexpr):
    """Per chunk (sampled rows): the best log-probability + Gumbel noise among the kept tokens, and its index."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    temp = tl.load(temp_ptr + row)
    if temp != 0.0:
        log_z, _, min_p = _log_norm(rf, ri, mp, min_p_ptr, row, tl.num_programs(1), MAX_CHUNKS)
        m, kept_mass = tl.load(rf + row * 8 + M), tl.load(rf + row * 8 + KEPT_MASS)
        t, cutoff = tl.load(ri + row * 16 + T), tl.load(ri + row * 16 + CUTOFF)
        seed = tl.load(seed_ptr + row)
        mask = tl.full((), 0xFFFFFFFF, tl.int64)
        high = seed >> 32
        low = _mix64(_mix64((seed & mask) ^ _mix64(high)) ^ (tl.load(step_ptr + row) & mask))
        key_high, key_low = _mix64(high ^ low).to(tl.uint32), low.to(tl.uint32)
        best = tl.full([BLOCK], float("-inf"), tl.float32)  # per lane, reduced once at the end
        best_index = tl.zeros([BLOCK], tl.int32)
        end = tl.minimum(vocab, (chunk + 1) * CHUNK)
        for start in range(chunk * CHUNK, end, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            s = _scaled(work_ptr + row * stride_work, cols, cols < end, temp)
            keep = _kept(s, cols, m, t, cutoff, kept_mass, min_p) & (cols < end)
            bits = _mix32(key_high ^ _mix32(key_low ^ _mix32(cols.to(tl.uint32) + 0x9E3779B9)))
            u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
            v = tl.where(keep, ((s - m) - log_z) + -tl.log(-tl.log(u)), float("-inf"))
            best_index = tl.where(v > best, cols, best_index)
            best = tl.maximum(best, v)
        top = tl.max(best, axis=0)
        first = tl.min(tl.where(best == top, best_index, 2147483647), axis=0)
        out = row * tl.num_programs(1) + chunk
        tl.store(gb + out, top)
        tl.store(gi + out, tl.where(top > float("-inf"), first, 0))


@triton.jit
def _pick_kernel(work_ptr, stride_work, raw_ptr, stride_raw, temp_ptr, min_p_ptr, raw_mode_ptr, rf, ri, mp, gb, gi,
                 num_chunks, token_ptr, logprob_ptr, MAX_CHUNKS: tl.constexpr):
    """The row's token (greedy, or the best chunk's) and its processed or raw logprob."""
    row = tl.program_id(0).to(tl.int64)
    temp = tl.load(temp_ptr + row)
    divisor = tl.where(temp == 0.0, 1.0, temp)
    log_z, count, _ = _log_norm(rf, ri, mp, min_p_ptr, row, num_chunks, MAX_CHUNKS)
    chunks = tl.arange(0, MAX_CHUNKS)
    sampled_row = tl.full([MAX_CHUNKS], 0.0, tl.float32) != temp  # (a tensor: the interpreter's & needs one)
    values = tl.load(gb + row * num_chunks + chunks, mask=(chunks < num_chunks) & sampled_row, other=float("-inf"))
    winner = tl.argmax(values, axis=0)
    sampled = tl.load(gi + row * num_chunks + winner, mask=temp != 0.0, other=0)
    token = tl.where(temp == 0.0, tl.load(ri + row * 16 + GREEDY), sampled).to(tl.int64)
    m, lse_raw = tl.load(rf + row * 8 + M), tl.load(rf + row * 8 + LSE_RAW)
    processed = (_scaled(work_ptr + row * stride_work, token, True, divisor) - m) - log_z
    raw_logprob = tl.load(raw_ptr + row * stride_raw + token).to(tl.float32) - lse_raw
    tl.store(token_ptr + row, token)
    tl.store(logprob_ptr + row, tl.where(tl.load(raw_mode_ptr + row) != 0, raw_logprob, processed))
    tl.store(rf + row * 8 + LOG_Z, log_z)
    tl.store(ri + row * 16 + COUNT, count)


def filtered_sample(logits: torch.Tensor, raw_logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                    top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                    use_raw: torch.Tensor, num_top: int, filters: bool = True,
                    any_min_p: bool = True) -> tuple[torch.Tensor, ...]:
    """Sample one token per row of `logits` [S, V] (bans already -inf, penalties applied).

    `raw_logits` [S, V] are the logits the raw logprobs are of (may be `logits` itself). Per-row settings
    are [S] device tensors: temperature float32 (0 = greedy), top_k int64 (>= V disables), top_p float32
    (>= 1 disables), min_p float32 (0 disables), seeds / steps int64, use_raw bool. `filters` False skips
    the top-k / top-p searches (no row has one), `any_min_p` False the min-p pass (no row has one). Returns
    token ids [S] int64, logprobs [S] float32, top ids [S, num_top] int64 and top logprobs [S, num_top] float32.
    """
    rows, vocab = logits.shape
    if logits.stride(1) != 1 or raw_logits.stride(1) != 1 or raw_logits.shape != logits.shape:
        raise ValueError(f"logits and raw_logits must be [S, V] with contiguous rows, got {tuple(logits.shape)} "
                         f"stride {logits.stride()} and {tuple(raw_logits.shape)} stride {raw_logits.stride()}")
    if not 0 <= num_top <= min(MAX_TOP_LOGPROBS, vocab):
        raise ValueError(f"top logprobs must be from 0 to {min(MAX_TOP_LOGPROBS, vocab)}, got {num_top}")
    device = logits.device
    token_ids = torch.empty(rows, dtype=torch.int64, device=device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=device)
    top_ids = torch.empty(rows, num_top, dtype=torch.int64, device=device)
    top_logprobs = torch.empty(rows, num_top, dtype=torch.float32, device=device)
    if rows == 0:
        return token_ids, logprobs, top_ids, top_logprobs
    chunks = triton.cdiv(vocab, CHUNK)
    max_chunks = max(2, triton.next_power_of_2(chunks))
    f32, i32 = dict(dtype=torch.float32, device=device), dict(dtype=torch.int32, device=device)
    cf, ci = torch.empty(rows, chunks, 4, **f32), torch.empty(rows, chunks, 4, **i32)
    rf, ri = torch.empty(rows, 8, **f32), torch.empty(rows, 16, **i32)
    states = [(torch.empty(rows, STATES, 8, **i32), torch.empty(rows, STATES, 4, **f32)) for _ in range(3)]
    (k_si, k_sf), (p_si, p_sf), (l_si, l_sf) = states
    cand_s, cand_id = torch.empty(rows, CAP, **f32), torch.empty(rows, CAP, **i32)
    grid, row_grid = (rows, chunks), (rows,)
    work_args = (logits, logits.stride(0))
    search = dict(STATES=STATES, CAP=CAP, BLOCK=ROW_BLOCK, NB=NB, VALUE_PASSES=VALUE_PASSES, num_warps=4)
    _stats_kernel[grid](*work_args, raw_logits, raw_logits.stride(0), vocab, temperature, cf, ci,
                        SEPARATE_RAW=raw_logits.data_ptr() != logits.data_ptr(), CHUNK=CHUNK, BLOCK=BLOCK,
                        num_warps=4)
    _setup_kernel[row_grid](cf, ci, chunks, temperature, top_k, use_raw, rf, ri, k_si, k_sf, l_si, l_sf, K=num_top,
                            MAX_CHUNKS=max_chunks, STATES=STATES, num_warps=1)
    if filters:
        run_passes(logits, logits, temperature, k_si, k_sf, cand_s, cand_id, CHUNK, CAP)
        _topk_done_kernel[row_grid](*work_args, vocab, temperature, top_p, rf, ri, k_si, k_sf, cand_s, cand_id,
                                    p_si, p_sf, **search)
        run_passes(logits, logits, temperature, p_si, p_sf, cand_s, cand_id, CHUNK, CAP)
        _topp_done_kernel[row_grid](*work_args, vocab, temperature, rf, ri, p_si, p_sf, cand_s, cand_id, **search)
    mp = torch.empty(rows, chunks, 2, **f32)
    if any_min_p:
        _min_p_kernel[grid](*work_args, vocab, temperature, min_p, rf, ri, mp, CHUNK=CHUNK, BLOCK=BLOCK, num_warps=4)
    gb, gi = torch.empty(rows, chunks, **f32), torch.empty(rows, chunks, **i32)
    _gumbel_kernel[grid](*work_args, vocab, temperature, min_p, seeds, steps, rf, ri, mp, gb, gi, CHUNK=CHUNK,
                         BLOCK=BLOCK, MAX_CHUNKS=max_chunks, num_warps=4)
    _pick_kernel[row_grid](*work_args, raw_logits, raw_logits.stride(0), temperature, min_p, use_raw, rf, ri, mp, gb,
                           gi, chunks, token_ids, logprobs, MAX_CHUNKS=max_chunks, num_warps=1)
    if num_top:
        rank_top_logprobs(logits, raw_logits, temperature, use_raw, rf, ri, l_si, l_sf, cand_s, cand_id, top_ids,
                          top_logprobs, CHUNK, CAP)
    return token_ids, logprobs, top_ids, top_logprobs
