"""The fused sampler for every setting: top-k, top-p, min-p, banned tokens, top logprobs, per row.

One program per row, in a few passes over the row (no sort, no host sync, static shapes):
1. stats: the row maximum m and sum of e = exp(s - m) of the scaled logits s = x / T, the greedy
   token, and the raw log-sum-exp;
2. thresholds: top-k keeps the first k tokens of the rank order (s descending, then token id
   ascending), top-p the first tokens whose mass before them is below top_p. Both are a prefix of
   the rank order: all tokens above a threshold value t plus the first c tokens tied at t. t is
   found by a bucketed search over the order-preserving integer keys of the float32 values: each
   pass counts and weighs the row's tokens in 16 buckets of the remaining key range and keeps the
   bucket holding the threshold, narrowed to the smallest and largest key seen in it (at most ~10
   passes, most of them over a handful of tokens);
3. min-p: tokens with probability below min_p * (the largest) leave; the mass of what stays;
4. Gumbel-max over the kept tokens with the counter-based hash of `worker.sampler.hashed_uniform`
   (the torch sampler's random numbers), the chosen token's logprob;
5. top logprobs: the K tokens first in the rank order (a count search, then a K x K rank sort).
This is `worker.sampler.torch_sample`'s distribution: the same tokens for the same seeds, the same
logprobs up to float32 rounding (sums are taken in another order, so a token within rounding of a
filter boundary may fall on the other side).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels.sampling import _mix32, _mix64

BLOCK = 2048  # entries per iteration of the streaming passes
SEARCH_BLOCK = 256  # entries per iteration of a search pass ([SEARCH_BLOCK, BUCKETS] tiles)
BUCKETS = 16
VALUE_PASSES = 2  # search passes that split the value range evenly before splitting the key range
MAX_TOP_LOGPROBS = 64


@triton.jit
def _scaled(ptr, cols, mask, divisor):
    """Logits / divisor in float32 (IEEE division, as torch), -0 made +0 so that it ties with +0."""
    s = tl.math.div_rn(tl.load(ptr + cols, mask=mask, other=float("-inf")).to(tl.float32), divisor)
    return tl.where(s == 0.0, 0.0, s)


@triton.jit
def _key(s):
    """An int32 key with the order of the float32 values."""
    bits = s.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _value(key):
    """The float32 value of a key (inverse of `_key`)."""
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _pivots(lo, hi, passes, buckets, NB: tl.constexpr, VALUE_PASSES: tl.constexpr):
    """The first key of each bucket of [lo, hi] (the first is lo): even in value for the first passes, then in key."""
    span = hi.to(tl.int64) - lo.to(tl.int64) + 1
    by_key = (lo.to(tl.int64) + span * buckets // NB).to(tl.int32)
    lo_v, hi_v = _value(lo), _value(hi)
    width = hi_v - lo_v
    by_value = tl.minimum(tl.maximum(_key(lo_v + width * (buckets.to(tl.float32) / NB)), lo), hi)
    by_value = tl.where(buckets == 0, lo, by_value)
    use_value = (passes < VALUE_PASSES) & (width < float("inf")) & (lo_v > float("-inf"))
    return tl.where(use_value, by_value, by_key)


@triton.jit
def _search(ptr, vocab, divisor, m, lo, hi, target, by_mass, tie_key, tie_scale,
            BLOCK: tl.constexpr, NB: tl.constexpr, VALUE_PASSES: tl.constexpr):
    """The largest token key t in [lo, hi] with W(>= t) >= target, given W(>= lo) >= target.

    W sums a weight over the tokens at or above a key: 1 (count), or e = exp(s - m) when `by_mass`;
    tokens at `tie_key` weigh tie_scale * e (the share of a tie an earlier filter kept).
    Returns t, the count and mass strictly above t, and the count and mass at t.
    """
    offs = tl.arange(0, BLOCK)
    buckets = tl.arange(0, NB)
    above_cnt = tl.sum(tl.zeros([NB], tl.int32), axis=0)
    above_mass = tl.sum(tl.zeros([NB], tl.float32), axis=0)
    tie_cnt, tie_mass = above_cnt, above_mass
    passes = above_cnt
    go = above_cnt == 0
    while go:
        qs = _pivots(lo, hi, passes, buckets, NB, VALUE_PASSES)
        cnt = tl.zeros([NB], tl.int32)
        mass = tl.zeros([NB], tl.float32)
        kmin = tl.full([NB], 2147483647, tl.int32)
        kmax = tl.full([NB], -2147483647, tl.int32)
        for start in range(0, vocab, BLOCK):
            cols = start + offs
            s = _scaled(ptr, cols, cols < vocab, divisor)
            k = _key(s)
            inside = (cols < vocab) & (k >= lo) & (k <= hi)
            if tl.max(inside.to(tl.int32), axis=0) > 0:
                e = tl.exp(s - m) * tl.where(k == tie_key, tie_scale, 1.0)
                b = tl.sum((k[:, None] >= qs[None, :]).to(tl.int32), axis=1) - 1
                hit = (b[:, None] == buckets[None, :]) & inside[:, None]
                cnt += tl.sum(hit.to(tl.int32), axis=0)
                mass += tl.sum(tl.where(hit, e[:, None], 0.0), axis=0)
                kmin = tl.minimum(kmin, tl.min(tl.where(hit, k[:, None], 2147483647), axis=0))
                kmax = tl.maximum(kmax, tl.max(tl.where(hit, k[:, None], -2147483647), axis=0))
        weight = tl.where(by_mass, mass, cnt.to(tl.float32))
        at_or_above = tl.sum(weight, axis=0) - tl.cumsum(weight, axis=0) + weight  # W(>= qs[j]) - above
        above_w = tl.where(by_mass, above_mass, above_cnt.to(tl.float32))
        chosen = tl.max(tl.where(above_w + at_or_above >= target, buckets, 0), axis=0)
        pick = buckets == chosen
        higher = buckets > chosen
        above_cnt += tl.sum(tl.where(higher, cnt, 0), axis=0)
        above_mass += tl.sum(tl.where(higher, mass, 0.0), axis=0)
        tie_cnt = tl.sum(tl.where(pick, cnt, 0), axis=0)
        tie_mass = tl.sum(tl.where(pick, mass, 0.0), axis=0)
        lo = tl.sum(tl.where(pick, kmin, 0), axis=0)
        hi = tl.sum(tl.where(pick, kmax, 0), axis=0)
        passes += 1
        go = lo < hi
    return lo, above_cnt, above_mass, tie_cnt, tie_mass


@triton.jit
def _stats(work, raw, vocab, divisor, SEPARATE_RAW: tl.constexpr, BLOCK: tl.constexpr):
    """Of s: max m, sum exp(s - m), first argmax, count of finite s and smallest finite key; of the raw
    logits: log-sum-exp and smallest key."""
    offs = tl.arange(0, BLOCK)
    m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    z = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    m_raw, z_raw, best = m, z, m
    best_index = tl.sum(tl.zeros([BLOCK], tl.int64), axis=0)
    finite = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
    low = tl.max(tl.full([BLOCK], 2147483647, tl.int32), axis=0)
    low_raw = low
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        x = tl.load(work + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        s = tl.math.div_rn(x, divisor)
        s = tl.where(s == 0.0, 0.0, s)
        if SEPARATE_RAW:
            x = tl.load(raw + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        tile_best = tl.max(s, axis=0)
        best_index = tl.where(tile_best > best, start + tl.argmax(s, axis=0).to(tl.int64), best_index)
        best = tl.maximum(best, tile_best)
        m_new = tl.maximum(m, tile_best)
        z = tl.where(m_new > float("-inf"), z * tl.exp(m - m_new), 0.0) + tl.sum(
            tl.where(s > float("-inf"), tl.exp(s - m_new), 0.0), axis=0)
        m = m_new
        m_raw_new = tl.maximum(m_raw, tl.max(x, axis=0))
        z_raw = z_raw * tl.exp(m_raw - m_raw_new) + tl.sum(tl.exp(x - m_raw_new), axis=0)
        m_raw = m_raw_new
        is_finite = s > float("-inf")
        finite += tl.sum(is_finite.to(tl.int32), axis=0)
        low = tl.minimum(low, tl.min(tl.where(is_finite, _key(s), 2147483647), axis=0))
        low_raw = tl.minimum(low_raw, tl.min(tl.where(cols < vocab, _key(tl.where(x == 0.0, 0.0, x)), 2147483647),
                                             axis=0))
    return m, z, best_index, finite, low, m_raw + tl.log(z_raw), low_raw


@triton.jit
def _filters(work, vocab, divisor, m, z, finite, low, top_k, top_p, SEARCH_BLOCK: tl.constexpr,
             NB: tl.constexpr, VALUE_PASSES: tl.constexpr):
    """The top-k then top-p prefix of the rank order: (threshold key t, ties kept at t, count and mass kept).

    Kept are the tokens whose key is above t and the first `ties` tokens (by id) at t.
    """
    t = _key(tl.full((), float("-inf"), tl.float32))  # no filter: every finite token lies above t
    ties = finite * 0
    kept, kept_mass = finite, z
    tie_scale = z * 0.0 + 1.0
    on_k = top_k < finite
    if on_k:
        t, above, above_mass, at_count, _ = _search(work, vocab, divisor, m, low, _key(m), top_k.to(tl.float32),
                                                    False, t, 1.0, SEARCH_BLOCK, NB, VALUE_PASSES)
        ties = top_k.to(tl.int32) - above
        kept = top_k.to(tl.int32)
        kept_mass = above_mass + ties.to(tl.float32) * tl.exp(_value(t) - m)
        tie_scale = ties.to(tl.float32) / at_count.to(tl.float32)
    if top_p < 1.0:
        target = top_p * kept_mass
        tp, above, above_mass, at_count, _ = _search(work, vocab, divisor, m, tl.where(on_k, t, low), _key(m),
                                                     target, True, t, tie_scale, SEARCH_BLOCK, NB, VALUE_PASSES)
        count = tl.where(on_k & (tp == t), ties, at_count)
        e = tl.exp(_value(tp) - m)
        # the i-th tied token (from 0) stays while the mass before it, above_mass + i * e, is below target
        room = tl.maximum(tl.ceil((target - above_mass) / e), 1.0)
        ties = tl.where(e > 0.0, tl.minimum(count.to(tl.float32), room).to(tl.int32), count)
        t, kept, kept_mass = tp, above + ties, above_mass + ties.to(tl.float32) * e
    return t, ties, kept, kept_mass


@triton.jit
def _kept(k, e, t, ties, tie_rank, kept_mass, min_p):
    """Whether tokens (keys k, e = exp(s - m), rank among the tokens at t) survive top-k, top-p and min-p."""
    prefix = (k > t) | ((k == t) & (tie_rank < ties))
    # min-p as torch: probs = e / Z < max(probs) * min_p, with max(probs) = 1 / Z
    return prefix & (e / kept_mass >= (1.0 / kept_mass) * min_p)


@triton.jit
def _final(work, vocab, divisor, m, t, ties, kept_mass, min_p, temp, key_high, key_low, BLOCK: tl.constexpr):
    """Count and mass of the kept tokens (after min-p), and the Gumbel-max pick among them (sampled rows)."""
    offs = tl.arange(0, BLOCK)
    count = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
    mass = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    seen = count
    if min_p > 0.0:
        for start in range(0, vocab, BLOCK):
            cols = start + offs
            s = _scaled(work, cols, cols < vocab, divisor)
            k = _key(s)
            at_t = (k == t) & (cols < vocab)
            tie_rank = seen + tl.cumsum(at_t.to(tl.int32), axis=0) - 1
            seen += tl.sum(at_t.to(tl.int32), axis=0)
            e = tl.exp(s - m)
            keep = _kept(k, e, t, ties, tie_rank, kept_mass, min_p) & (cols < vocab)
            count += tl.sum(keep.to(tl.int32), axis=0)
            mass += tl.sum(tl.where(keep, e, 0.0), axis=0)
    else:
        mass = kept_mass
    log_z = tl.log(mass)
    best = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    best_index = tl.sum(tl.zeros([BLOCK], tl.int64), axis=0)
    seen = seen * 0
    if temp != 0.0:
        for start in range(0, vocab, BLOCK):
            cols = start + offs
            s = _scaled(work, cols, cols < vocab, divisor)
            k = _key(s)
            at_t = (k == t) & (cols < vocab)
            tie_rank = seen + tl.cumsum(at_t.to(tl.int32), axis=0) - 1
            seen += tl.sum(at_t.to(tl.int32), axis=0)
            keep = _kept(k, tl.exp(s - m), t, ties, tie_rank, kept_mass, min_p) & (cols < vocab)
            bits = _mix32(key_high ^ _mix32(key_low ^ _mix32(cols.to(tl.uint32) + 0x9E3779B9)))
            u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
            v = tl.where(keep, ((s - m) - log_z) + -tl.log(-tl.log(u)), float("-inf"))
            tile_best = tl.max(v, axis=0)
            best_index = tl.where(tile_best > best, start + tl.argmax(v, axis=0).to(tl.int64), best_index)
            best = tl.maximum(best, tile_best)
    return count, log_z, best_index


@triton.jit
def _row_key(seed_ptr, step_ptr, row):
    """The row's hash key (high, low) as `worker.sampler._row_keys`."""
    seed = tl.load(seed_ptr + row)
    mask = tl.full((), 0xFFFFFFFF, tl.int64)
    high = seed >> 32
    low = _mix64(_mix64((seed & mask) ^ _mix64(high)) ^ (tl.load(step_ptr + row) & mask))
    return _mix64(high ^ low).to(tl.uint32), low.to(tl.uint32)


@triton.jit
def _top_logprobs(src, vocab, divisor, lowest, top_max, rank_limit, shift, log_z, processed, scratch, ids_out, vals_out,
                  K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr,
                  NB: tl.constexpr, VALUE_PASSES: tl.constexpr):
    """The first K tokens of the rank order of s = src / divisor, in that order, with
    values (s - shift) - log_z; where `processed`, -inf from rank `rank_limit` on (tokens the filters dropped).
    At least K tokens have keys >= lowest, none above key(top_max)."""
    t, above, _, _, _ = _search(src, vocab, divisor, top_max, lowest, _key(top_max), K * 1.0, False, lowest, 1.0,
                                SEARCH_BLOCK, NB, VALUE_PASSES)
    offs = tl.arange(0, BLOCK)
    ties = K - above
    seen = above * 0
    taken = above * 0
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        k = _key(_scaled(src, cols, cols < vocab, divisor))
        at_t = (k == t) & (cols < vocab)
        tie_rank = seen + tl.cumsum(at_t.to(tl.int32), axis=0) - 1
        seen += tl.sum(at_t.to(tl.int32), axis=0)
        take = ((k > t) | (at_t & (tie_rank < ties))) & (cols < vocab)
        slot = taken + tl.cumsum(take.to(tl.int32), axis=0) - 1
        tl.store(scratch + slot, cols.to(tl.int64), mask=take)
        taken += tl.sum(take.to(tl.int32), axis=0)
    tl.debug_barrier()
    lanes = tl.arange(0, KP)
    valid = lanes < K
    ids = tl.load(scratch + lanes, mask=valid, other=0)
    s = _scaled(src, ids, valid, divisor)
    k = _key(s)
    before = (k[None, :] > k[:, None]) | ((k[None, :] == k[:, None]) & (ids[None, :] < ids[:, None]))
    rank = tl.sum((before & valid[None, :]).to(tl.int32), axis=1)
    vals = tl.where(processed & (rank >= rank_limit), float("-inf"), (s - shift) - log_z)
    tl.store(ids_out + rank, ids, mask=valid)
    tl.store(vals_out + rank, vals, mask=valid)


@triton.jit
def _sample_kernel(work_ptr, stride_work, raw_ptr, stride_raw, vocab, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr,
                   seed_ptr, step_ptr, raw_mode_ptr, token_ptr, logprob_ptr, top_ids_ptr, top_vals_ptr, scratch_ptr,
                   K: tl.constexpr, KP: tl.constexpr, SEPARATE_RAW: tl.constexpr, BLOCK: tl.constexpr,
                   SEARCH_BLOCK: tl.constexpr, NB: tl.constexpr, VALUE_PASSES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # offsets below can pass 2**31
    work = work_ptr + row * stride_work
    raw = raw_ptr + row * stride_raw
    temp = tl.load(temp_ptr + row)
    divisor = tl.where(temp == 0.0, 1.0, temp)
    use_raw = tl.load(raw_mode_ptr + row) != 0
    m, z, greedy_index, finite, low, lse_raw, low_raw = _stats(work, raw, vocab, divisor, SEPARATE_RAW, BLOCK)
    bottom = _key(tl.full((), float("-inf"), tl.float32))
    t = bottom  # no filter: every finite token lies above t
    ties, kept, kept_mass = finite * 0, finite, z
    min_p = tl.load(min_p_ptr + row)
    if (temp != 0.0) | (tl.load(raw_mode_ptr + row) == 0):  # the filters matter: sampled, or processed logprobs
        t, ties, kept, kept_mass = _filters(work, vocab, divisor, m, z, finite, low, tl.load(top_k_ptr + row),
                                            tl.load(top_p_ptr + row), SEARCH_BLOCK, NB, VALUE_PASSES)
    else:
        min_p = min_p * 0.0
    key_high, key_low = _row_key(seed_ptr, step_ptr, row)
    count, log_z, sampled = _final(work, vocab, divisor, m, t, ties, kept_mass, min_p, temp, key_high, key_low,
                                   BLOCK)
    count = tl.where(min_p > 0.0, count, kept)
    token = tl.where(temp == 0.0, greedy_index, sampled)
    processed = (_scaled(work, token, True, divisor) - m) - log_z
    raw_logprob = tl.load(raw + token).to(tl.float32) - lse_raw
    tl.store(token_ptr + row, token)
    tl.store(logprob_ptr + row, tl.where(use_raw, raw_logprob, processed))
    if K > 0:
        scratch, ids_out, vals_out = scratch_ptr + row * KP, top_ids_ptr + row * K, top_vals_ptr + row * K
        if use_raw:
            _top_logprobs(raw, vocab, 1.0, low_raw, lse_raw, count, 0.0, lse_raw, False, scratch, ids_out, vals_out,
                          K, KP, BLOCK, SEARCH_BLOCK, NB, VALUE_PASSES)
        else:
            _top_logprobs(work, vocab, divisor, tl.where(finite >= K, low, bottom), m, count, m, log_z, True, scratch, ids_out, vals_out,
                          K, KP, BLOCK, SEARCH_BLOCK, NB, VALUE_PASSES)


def filtered_sample(logits: torch.Tensor, raw_logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                    top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                    use_raw: torch.Tensor, num_top: int) -> tuple[torch.Tensor, ...]:
    """Sample one token per row of `logits` [S, V] (bans already -inf, penalties applied).

    `raw_logits` [S, V] are the logits the raw logprobs are of (may be `logits` itself). Per-row settings
    are [S] device tensors: temperature float32 (0 = greedy), top_k int64 (>= V disables), top_p float32
    (>= 1 disables), min_p float32 (0 disables), seeds / steps int64, use_raw bool. Returns token ids [S]
    int64, logprobs [S] float32, top ids [S, num_top] int64 and top logprobs [S, num_top] float32.
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
    padded = max(2, triton.next_power_of_2(num_top))
    scratch = torch.empty(rows, padded, dtype=torch.int64, device=device) if num_top else top_ids
    if rows:
        _sample_kernel[(rows,)](
            logits, logits.stride(0), raw_logits, raw_logits.stride(0), vocab, temperature, top_k, top_p, min_p,
            seeds, steps, use_raw, token_ids, logprobs, top_ids, top_logprobs, scratch,
            K=num_top, KP=padded, SEPARATE_RAW=raw_logits.data_ptr() != logits.data_ptr(), BLOCK=BLOCK,
            SEARCH_BLOCK=SEARCH_BLOCK, NB=BUCKETS, VALUE_PASSES=VALUE_PASSES, num_warps=8)
    return token_ids, logprobs, top_ids, top_logprobs
