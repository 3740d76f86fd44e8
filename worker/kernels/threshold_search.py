"""Threshold search over a row of logits, split across many programs per row (the filtered sampler's core).

A search finds, for one row, the largest token key t with W(>= t) >= target, where keys are the
order-preserving int32 images of the float32 values s and W sums a weight over the tokens at or
above a key: 1 (a count, for top-k and top logprobs) or e = exp(s - m) (a mass, for top-p); tokens
at `tie_key` weigh tie_scale * e (the share of a tie an earlier filter kept).

The search state of a row moves through fixed launches (static shapes, no host sync):
1. PASSES bucket passes, grid (rows, chunks of CHUNK tokens): each chunk program counts and weighs
   its tokens inside the row's key range [lo, hi] at or above each of NB pivots (cumulative tallies:
   a compare per token and pivot, no bucket index); the next launch combines the chunks' tallies
   (every program alike; chunk 0 writes the result) and narrows [lo, hi] to the pivots around the
   threshold;
2. a compaction, grid (rows, chunks): the tokens left in [lo, hi] (at most CAP of them) are copied,
   in token-id order, to a per-row candidate list;
3. the finish (one program per row, `finish_search`): the same bucket search, over the candidates
   (a few thousand values at most), or over the whole row where more than CAP tokens were left.
State per row and pass: int32 [active, lo, hi, above count, by_mass, tie_key, raw_src, candidates]
and float32 [above mass, target, tie_scale, m].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 8192  # tokens per program of the chunk-parallel passes
SEARCH_BLOCK = 128  # tokens per iteration of a bucket pass ([SEARCH_BLOCK, NB] tiles, per-lane tallies)
BLOCK = 1024  # tokens per iteration of a chunk's streaming loops (compaction; the sampler's chunk kernels)
ROW_BLOCK = 256  # tokens per iteration of a per-row search ([ROW_BLOCK, NB] tiles; `finish_search`)
NB = 16  # buckets per pass
VALUE_PASSES = 2  # passes that split the value range evenly before splitting the key range
PASSES = 3  # chunk-parallel bucket passes before the compaction
CAP = 2048  # candidates per row
INT_MAX = tl.constexpr(2147483647)
STATES = PASSES + 1  # search states per row: the initial one and one after each bucket pass


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
def _init_search(si, sf, row, active, lo, hi, target, by_mass, tie_key, raw_src, tie_scale, m,
                 STATES: tl.constexpr):
    """Write state 0 of a search (see `worker.kernels.threshold_search`); flags are int32 0 / 1."""
    base_i, base_f = si + row * STATES * 8, sf + row * STATES * 4
    tl.store(base_i, lo * 0 + active)
    tl.store(base_i + 1, lo)
    tl.store(base_i + 2, hi)
    tl.store(base_i + 3, lo * 0)
    tl.store(base_i + 4, lo * 0 + by_mass)
    tl.store(base_i + 5, tie_key)
    tl.store(base_i + 6, lo * 0 + raw_src)
    tl.store(base_i + 7, lo * 0)
    tl.store(base_f, m * 0.0)
    tl.store(base_f + 1, m * 0.0 + target)  # (scalars may be Python numbers: stored as tensors)
    tl.store(base_f + 2, m * 0.0 + tie_scale)
    tl.store(base_f + 3, m)


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
def _tally(s, inside, qs, m, tie_key, tie_scale, cnt, mass, kmin, kmax, NB: tl.constexpr):
    """Add the tokens (values s, where `inside`) to the buckets starting at keys qs."""
    buckets = tl.arange(0, NB)
    k = _key(s)
    e = tl.exp(s - m) * tl.where(k == tie_key, tie_scale, 1.0)
    b = tl.sum((k[:, None] >= qs[None, :]).to(tl.int32), axis=1) - 1
    hit = (b[:, None] == buckets[None, :]) & inside[:, None]
    cnt += tl.sum(hit.to(tl.int32), axis=0)
    mass += tl.sum(tl.where(hit, e[:, None], 0.0), axis=0)
    kmin = tl.minimum(kmin, tl.min(tl.where(hit, k[:, None], INT_MAX), axis=0))
    kmax = tl.maximum(kmax, tl.max(tl.where(hit, k[:, None], -INT_MAX), axis=0))
    return cnt, mass, kmin, kmax


@triton.jit
def _narrow(cnt, mass, kmin, kmax, by_mass, above_cnt, above_mass, target, NB: tl.constexpr):
    """The bucket holding the threshold: (its index, the new above count / mass, its smallest and largest key)."""
    buckets = tl.arange(0, NB)
    weight = tl.where(by_mass, mass, cnt.to(tl.float32))
    at_or_above = tl.sum(weight, axis=0) - tl.cumsum(weight, axis=0) + weight  # W(>= qs[j]) - above
    above_w = tl.where(by_mass, above_mass, above_cnt.to(tl.float32))
    chosen = tl.max(tl.where(above_w + at_or_above >= target, buckets, 0), axis=0)
    pick = buckets == chosen
    higher = buckets > chosen
    above_cnt += tl.sum(tl.where(higher, cnt, 0), axis=0)
    above_mass += tl.sum(tl.where(higher, mass, 0.0), axis=0)
    return (chosen, above_cnt, above_mass, tl.sum(tl.where(pick, kmin, 0), axis=0),
            tl.sum(tl.where(pick, kmax, 0), axis=0))


@triton.jit
def _tally_at_or_above(k, e, inside, qs, cnt, mass):
    """Add the tokens (keys k, weights e, where `inside`) to the per-lane count and weight at or above each pivot
    of qs (cnt / mass are [lanes, NB] tiles, summed over the lanes once at the end of the chunk)."""
    ge = inside[:, None] & (k[:, None] >= qs[None, :])
    return cnt + ge.to(tl.int32), mass + tl.where(ge, e[:, None], 0.0)


@triton.jit
def _narrow_at_or_above(cnt, mass, qs, hi, by_mass, above_cnt, above_mass, target, NB: tl.constexpr):
    """From the tallies at or above each pivot: the chosen pivot's index (the last with W(>= it) >= target),
    the new above count / mass and the new range [its pivot, the next pivot - 1]."""
    buckets = tl.arange(0, NB)
    weight = tl.where(by_mass, mass, cnt.to(tl.float32))
    above_w = tl.where(by_mass, above_mass, above_cnt.to(tl.float32))
    chosen = tl.max(tl.where(above_w + weight >= target, buckets, 0), axis=0)
    nxt = buckets == chosen + 1
    new_hi = tl.where(chosen == NB - 1, hi, tl.sum(tl.where(nxt, qs, 0), axis=0) - 1)
    return (chosen, above_cnt + tl.sum(tl.where(nxt, cnt, 0), axis=0),
            above_mass + tl.sum(tl.where(nxt, mass, 0.0), axis=0),
            tl.sum(tl.where(buckets == chosen, qs, 0), axis=0), new_hi)


@triton.jit
def _search(ptr, vocab, divisor, m, lo, hi, target, by_mass, tie_key, tie_scale,
            BLOCK: tl.constexpr, NB: tl.constexpr, VALUE_PASSES: tl.constexpr):
    """One program's search over ptr[:vocab] / divisor: the largest key t in [lo, hi] with W(>= t) >= target,
    given W(>= lo) >= target (tokens outside [lo, hi] count for nothing).

    Returns t, the count and mass strictly above t (inside [lo, hi]), and the count and mass at t.
    """
    offs = tl.arange(0, BLOCK)
    above_cnt = tl.sum(tl.zeros([NB], tl.int32), axis=0)
    above_mass = tl.sum(tl.zeros([NB], tl.float32), axis=0)
    tie_cnt, tie_mass = above_cnt, above_mass
    passes = above_cnt
    go = above_cnt == 0  # at least one pass: it counts the tokens at t
    while go:
        qs = _pivots(lo, hi, passes, tl.arange(0, NB), NB, VALUE_PASSES)
        cnt = tl.zeros([NB], tl.int32)
        mass = tl.zeros([NB], tl.float32)
        kmin = tl.full([NB], INT_MAX, tl.int32)
        kmax = tl.full([NB], -INT_MAX, tl.int32)
        for start in range(0, vocab, BLOCK):
            cols = start + offs
            s = _scaled(ptr, cols, cols < vocab, divisor)
            k = _key(s)
            inside = (cols < vocab) & (k >= lo) & (k <= hi)
            if tl.max(inside.to(tl.int32), axis=0) > 0:
                cnt, mass, kmin, kmax = _tally(s, inside, qs, m, tie_key, tie_scale, cnt, mass, kmin, kmax, NB)
        chosen, above_cnt, above_mass, lo, hi = _narrow(cnt, mass, kmin, kmax, by_mass, above_cnt, above_mass,
                                                        target, NB)
        pick = tl.arange(0, NB) == chosen
        tie_cnt = tl.sum(tl.where(pick, cnt, 0), axis=0)
        tie_mass = tl.sum(tl.where(pick, mass, 0.0), axis=0)
        passes += 1
        go = lo < hi
    return lo, above_cnt, above_mass, tie_cnt, tie_mass


@triton.jit
def _src(work, raw, raw_src, cols, mask, divisor):
    """The searched values: raw logits (raw_src), or the working logits / divisor."""
    if raw_src:
        s = _scaled(raw, cols, mask, 1.0)
    else:
        s = _scaled(work, cols, mask, divisor)
    return s


@triton.jit
def _advance(si, sf, hist_i, hist_f, row, p, rows, num_chunks, write, STATES: tl.constexpr, NB: tl.constexpr,
             MAX_CHUNKS: tl.constexpr, VALUE_PASSES: tl.constexpr):
    """State p of `row` from state p - 1 and the chunks' tallies of pass p - 1 (written where `write`).

    Returns active, lo, hi and each chunk's count in the chosen range ([MAX_CHUNKS])."""
    prev_i = si + (row * STATES + p - 1) * 8
    prev_f = sf + (row * STATES + p - 1) * 4
    active = tl.load(prev_i) != 0
    lo, hi, above_cnt = tl.load(prev_i + 1), tl.load(prev_i + 2), tl.load(prev_i + 3)
    above_mass, target = tl.load(prev_f), tl.load(prev_f + 1)
    chunks = tl.arange(0, MAX_CHUNKS)
    buckets = tl.arange(0, NB)
    ok = (chunks[:, None] < num_chunks) & active
    offs = (((p - 1) % 2 * rows + row) * num_chunks + chunks)[:, None] * NB + buckets[None, :]
    cnt2 = tl.load(hist_i + offs, mask=ok, other=0)
    mass = tl.sum(tl.load(hist_f + offs, mask=ok, other=0.0), axis=0)
    qs = _pivots(lo, hi, p - 1, buckets, NB, VALUE_PASSES)
    chosen, new_cnt, new_mass, new_lo, new_hi = _narrow_at_or_above(
        tl.sum(cnt2, axis=0), mass, qs, hi, tl.load(prev_i + 4) != 0, above_cnt, above_mass, target, NB)
    lo, hi = tl.where(active, new_lo, lo), tl.where(active, new_hi, hi)
    above_cnt, above_mass = tl.where(active, new_cnt, above_cnt), tl.where(active, new_mass, above_mass)
    if write:
        cur_i = si + (row * STATES + p) * 8
        cur_f = sf + (row * STATES + p) * 4
        tl.store(cur_i, active.to(tl.int32))
        tl.store(cur_i + 1, lo)
        tl.store(cur_i + 2, hi)
        tl.store(cur_i + 3, above_cnt)
        for j in tl.static_range(4, 7):
            tl.store(cur_i + j, tl.load(prev_i + j))
        tl.store(cur_f, above_mass)
        for j in tl.static_range(1, 4):
            tl.store(cur_f + j, tl.load(prev_f + j))
    in_range = tl.where(buckets[None, :] == chosen, cnt2, 0) - tl.where(buckets[None, :] == chosen + 1, cnt2, 0)
    return active, lo, hi, tl.sum(in_range, axis=1)


@triton.jit
def _bucket_kernel(work_ptr, stride_work, raw_ptr, stride_raw, vocab, temp_ptr, si, sf, hist_i, hist_f, p, rows,
                   STATES: tl.constexpr, NB: tl.constexpr, MAX_CHUNKS: tl.constexpr, CHUNK: tl.constexpr,
                   SEARCH_BLOCK: tl.constexpr, VALUE_PASSES: tl.constexpr):
    """Pass p: advance the state (p > 0), then this chunk's tallies at or above the pivots of the row's range."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    if p > 0:
        active, lo, hi, _ = _advance(si, sf, hist_i, hist_f, row, p, rows, num_chunks, chunk == 0, STATES, NB,
                                     MAX_CHUNKS, VALUE_PASSES)
    else:
        active = tl.load(si + row * STATES * 8) != 0
        lo, hi = tl.load(si + row * STATES * 8 + 1), tl.load(si + row * STATES * 8 + 2)
    if active:
        first_i, first_f = si + row * STATES * 8, sf + row * STATES * 4
        tie_key, raw_src = tl.load(first_i + 5), tl.load(first_i + 6) != 0
        tie_scale, m = tl.load(first_f + 2), tl.load(first_f + 3)
        temp = tl.load(temp_ptr + row)
        divisor = tl.where(temp == 0.0, 1.0, temp)
        work, raw = work_ptr + row * stride_work, raw_ptr + row * stride_raw
        qs = _pivots(lo, hi, p, tl.arange(0, NB), NB, VALUE_PASSES)
        cnt = tl.zeros([SEARCH_BLOCK, NB], tl.int32)
        mass = tl.zeros([SEARCH_BLOCK, NB], tl.float32)
        end = tl.minimum(vocab, (chunk + 1) * CHUNK)
        for start in range(chunk * CHUNK, end, SEARCH_BLOCK):
            cols = start + tl.arange(0, SEARCH_BLOCK)
            s = _src(work, raw, raw_src, cols, cols < end, divisor)
            k = _key(s)
            inside = (cols < end) & (k >= lo) & (k <= hi)
            if tl.max(inside.to(tl.int32), axis=0) > 0:
                e = tl.exp(s - m) * tl.where(k == tie_key, tie_scale, 1.0)
                cnt, mass = _tally_at_or_above(k, e, inside, qs, cnt, mass)
        out = (((p % 2) * rows + row) * num_chunks + chunk) * NB + tl.arange(0, NB)
        tl.store(hist_i + out, tl.sum(cnt, axis=0))
        tl.store(hist_f + out, tl.sum(mass, axis=0))


@triton.jit
def _compact_kernel(work_ptr, stride_work, raw_ptr, stride_raw, vocab, temp_ptr, si, sf, hist_i, hist_f, cand_s,
                    cand_id, rows, STATES: tl.constexpr, NB: tl.constexpr, MAX_CHUNKS: tl.constexpr,
                    CHUNK: tl.constexpr, BLOCK: tl.constexpr, CAP: tl.constexpr, VALUE_PASSES: tl.constexpr):
    """Advance to the last state, then copy this chunk's tokens inside [lo, hi] to the row's candidates
    (values and ids, in id order), where the row has at most CAP of them."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    last = STATES - 1
    active, lo, hi, counts = _advance(si, sf, hist_i, hist_f, row, last, rows, num_chunks, chunk == 0, STATES, NB,
                                      MAX_CHUNKS, VALUE_PASSES)
    total = tl.sum(counts, axis=0)
    if chunk == 0:
        tl.store(si + (row * STATES + last) * 8 + 7, total)
    if active & (total <= CAP):
        written = tl.sum(tl.where(tl.arange(0, MAX_CHUNKS) < chunk, counts, 0), axis=0)
        raw_src = tl.load(si + row * STATES * 8 + 6) != 0
        temp = tl.load(temp_ptr + row)
        divisor = tl.where(temp == 0.0, 1.0, temp)
        work, raw = work_ptr + row * stride_work, raw_ptr + row * stride_raw
        end = tl.minimum(vocab, (chunk + 1) * CHUNK)
        for start in range(chunk * CHUNK, end, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            s = _src(work, raw, raw_src, cols, cols < end, divisor)
            k = _key(s)
            inside = (cols < end) & (k >= lo) & (k <= hi)
            slot = written + tl.cumsum(inside.to(tl.int32), axis=0) - 1
            tl.store(cand_s + row * CAP + slot, s, mask=inside)
            tl.store(cand_id + row * CAP + slot, cols, mask=inside)
            written += tl.sum(inside.to(tl.int32), axis=0)


@triton.jit
def finish_search(work, raw, vocab, divisor, si, sf, cand_s, row, STATES: tl.constexpr, CAP: tl.constexpr,
                  BLOCK: tl.constexpr, NB: tl.constexpr, VALUE_PASSES: tl.constexpr):
    """The search's result for `row` (see `_search`, counts and masses over the whole row), from its last state:
    over the candidates where the compaction kept them all, else over the row (`work` and `raw` at the row)."""
    state_i = si + (row * STATES + STATES - 1) * 8
    state_f = sf + (row * STATES + STATES - 1) * 4
    lo, hi, above_cnt = tl.load(state_i + 1), tl.load(state_i + 2), tl.load(state_i + 3)
    by_mass, tie_key, raw_src, total = tl.load(state_i + 4) != 0, tl.load(state_i + 5), tl.load(state_i + 6) != 0, \
        tl.load(state_i + 7)
    above_mass, target, tie_scale, m = tl.load(state_f), tl.load(state_f + 1), tl.load(state_f + 2), \
        tl.load(state_f + 3)
    rest = target - tl.where(by_mass, above_mass, above_cnt.to(tl.float32))
    if total <= CAP:
        t, a_cnt, a_mass, t_cnt, t_mass = _search(cand_s + row * CAP, total, 1.0, m, lo, hi, rest, by_mass, tie_key,
                                                  tie_scale, BLOCK, NB, VALUE_PASSES)
    elif raw_src:
        t, a_cnt, a_mass, t_cnt, t_mass = _search(raw, vocab, 1.0, m, lo, hi, rest, by_mass, tie_key, tie_scale,
                                                  BLOCK, NB, VALUE_PASSES)
    else:
        t, a_cnt, a_mass, t_cnt, t_mass = _search(work, vocab, divisor, m, lo, hi, rest, by_mass, tie_key,
                                                  tie_scale, BLOCK, NB, VALUE_PASSES)
    return t, above_cnt + a_cnt, above_mass + a_mass, t_cnt, t_mass


@triton.jit
def nth_at(work, vocab, divisor, cand_s, cand_id, si, row, t, n, STATES: tl.constexpr, CAP: tl.constexpr,
           BLOCK: tl.constexpr):
    """The id of the n-th token (from 1, in id order) with key t, -1 where n <= 0; t is in the last state's range."""
    total = tl.load(si + (row * STATES + STATES - 1) * 8 + 7)
    compacted = total <= CAP
    length = tl.where(compacted, total, vocab)
    seen = total * 0
    found = seen - 1
    for start in range(0, length, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        if compacted:
            ids = tl.load(cand_id + row * CAP + cols, mask=cols < length, other=0)
            k = _key(tl.load(cand_s + row * CAP + cols, mask=cols < length, other=float("-inf")))
        else:
            ids = cols
            k = _key(_scaled(work, cols, cols < length, divisor))
        at_t = (k == t) & (cols < length)
        rank = seen + tl.cumsum(at_t.to(tl.int32), axis=0)
        found = tl.maximum(found, tl.max(tl.where(at_t & (rank == n), ids, -1), axis=0))
        seen += tl.sum(at_t.to(tl.int32), axis=0)
    return tl.where(n > 0, found, -1)


def run_passes(work, raw, temperature, si, sf, cand_s, cand_id, chunk: int, cap: int) -> None:
    """Launch the bucket passes and the compaction of one search (state 0 already in si / sf), over
    chunks of `chunk` tokens, keeping at most `cap` candidates per row."""
    rows, vocab = work.shape
    num_chunks = triton.cdiv(vocab, chunk)
    states = STATES
    hist_i = work.new_empty((2, rows, num_chunks, NB), dtype=torch.int32)
    hist_f = work.new_empty((2, rows, num_chunks, NB), dtype=torch.float32)
    max_chunks = max(2, triton.next_power_of_2(num_chunks))
    args = (work, work.stride(0), raw, raw.stride(0), vocab, temperature, si, sf, hist_i, hist_f)
    for p in range(PASSES):
        _bucket_kernel[(rows, num_chunks)](*args, p, rows, STATES=states, NB=NB, MAX_CHUNKS=max_chunks, CHUNK=chunk,
                                           SEARCH_BLOCK=SEARCH_BLOCK, VALUE_PASSES=VALUE_PASSES, num_warps=4)
    _compact_kernel[(rows, num_chunks)](*args, cand_s, cand_id, rows, STATES=states, NB=NB, MAX_CHUNKS=max_chunks,
                                        CHUNK=chunk, BLOCK=BLOCK, CAP=cap, VALUE_PASSES=VALUE_PASSES,
                                        num_warps=4)
