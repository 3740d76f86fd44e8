"""Top logprobs of the fused sampler: the first K tokens of each row's rank order (s descending, then token id
ascending) with their processed or raw logprobs.

The K-th key of the rank order is found by the threshold search of `worker.kernels.threshold_search`
(state 0 written by the sampler's setup kernel); every chunk then lists its tokens above that key and its
first ties at it, and one program per row ranks the chunks' lists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels.row_results import ABOVE_TOP, COUNT, LOG_Z, LSE_RAW, M, T_TOP
from worker.kernels.threshold_search import (BLOCK, NB, ROW_BLOCK, STATES, VALUE_PASSES, _key, _src,
                                             finish_search, run_passes)


@triton.jit
def _top_done_kernel(work_ptr, stride_work, raw_ptr, stride_raw, vocab, temp_ptr, ri, l_si, l_sf, cand_s,
                     STATES: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr,
                     VALUE_PASSES: tl.constexpr):
    """Finish the top-logprobs search: the K-th key of the rank order and the count above it."""
    row = tl.program_id(0).to(tl.int64)
    temp = tl.load(temp_ptr + row)
    divisor = tl.where(temp == 0.0, 1.0, temp)
    t, above, _, _, _ = finish_search(work_ptr + row * stride_work, raw_ptr + row * stride_raw, vocab, divisor,
                                      l_si, l_sf, cand_s, row, STATES, CAP, BLOCK, NB, VALUE_PASSES)
    tl.store(ri + row * 16 + T_TOP, t)
    tl.store(ri + row * 16 + ABOVE_TOP, above)


@triton.jit
def _slots_kernel(work_ptr, stride_work, raw_ptr, stride_raw, vocab, temp_ptr, raw_mode_ptr, ri, slots,
                  K: tl.constexpr, KP: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Per chunk: the ids of its tokens above the K-th key and of its first ties at it (the row's first K
    tokens are among the chunks' lists), -1 in the unused slots."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    temp = tl.load(temp_ptr + row)
    divisor = tl.where(temp == 0.0, 1.0, temp)
    use_raw = tl.load(raw_mode_ptr + row) != 0
    t, ties = tl.load(ri + row * 16 + T_TOP), K - tl.load(ri + row * 16 + ABOVE_TOP)
    out = slots + (row * tl.num_programs(1) + chunk) * KP
    seen = ties * 0
    taken = ties * 0
    end = tl.minimum(vocab, (chunk + 1) * CHUNK)
    for start in range(chunk * CHUNK, end, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        k = _key(_src(work_ptr + row * stride_work, raw_ptr + row * stride_raw, use_raw, cols, cols < end, divisor))
        at_t = (k == t) & (cols < end)
        tie_rank = seen + tl.cumsum(at_t.to(tl.int32), axis=0) - 1
        seen += tl.sum(at_t.to(tl.int32), axis=0)
        take = ((k > t) & (cols < end)) | (at_t & (tie_rank < ties))
        slot = taken + tl.cumsum(take.to(tl.int32), axis=0) - 1
        tl.store(out + slot, cols, mask=take & (slot < KP))
        taken += tl.sum(take.to(tl.int32), axis=0)
    lanes = tl.arange(0, KP)
    tl.store(out + lanes, tl.full([KP], -1, tl.int32), mask=lanes >= taken)


@triton.jit
def _rank_kernel(work_ptr, stride_work, raw_ptr, stride_raw, temp_ptr, raw_mode_ptr, rf, ri, slots, num_slots,
                 ids_out, vals_out, K: tl.constexpr, N: tl.constexpr, RB: tl.constexpr):
    """The first K tokens of the row's rank order among the chunks' slots, in order, with their logprobs
    (processed ones: -inf from the kept count on, for tokens the filters dropped)."""
    row = tl.program_id(0).to(tl.int64)
    temp = tl.load(temp_ptr + row)
    divisor = tl.where(temp == 0.0, 1.0, temp)
    use_raw = tl.load(raw_mode_ptr + row) != 0
    work, raw = work_ptr + row * stride_work, raw_ptr + row * stride_raw
    lanes = tl.arange(0, N)
    ids = tl.load(slots + row * num_slots + lanes, mask=lanes < num_slots, other=-1)
    valid = ids >= 0
    k = _key(_src(work, raw, use_raw, ids, valid, divisor))
    shift = tl.where(use_raw, 0.0, tl.load(rf + row * 8 + M))
    log_z = tl.where(use_raw, tl.load(rf + row * 8 + LSE_RAW), tl.load(rf + row * 8 + LOG_Z))
    count = tl.load(ri + row * 16 + COUNT)
    for start in range(0, N, RB):
        mine = start + tl.arange(0, RB)
        my_ids = tl.load(slots + row * num_slots + mine, mask=mine < num_slots, other=-1)
        my_ok = my_ids >= 0
        s = _src(work, raw, use_raw, my_ids, my_ok, divisor)
        my_k = _key(s)
        before = (k[None, :] > my_k[:, None]) | ((k[None, :] == my_k[:, None]) & (ids[None, :] < my_ids[:, None]))
        rank = tl.sum((before & valid[None, :]).to(tl.int32), axis=1)
        vals = tl.where((~use_raw) & (rank >= count), float("-inf"), (s - shift) - log_z)
        store = my_ok & (rank < K)
        tl.store(ids_out + row * K + rank, my_ids.to(tl.int64), mask=store)
        tl.store(vals_out + row * K + rank, vals, mask=store)


def top_logprobs(logits: torch.Tensor, raw_logits: torch.Tensor, temperature: torch.Tensor, use_raw: torch.Tensor,
                 rf: torch.Tensor, ri: torch.Tensor, si: torch.Tensor, sf: torch.Tensor, cand_s: torch.Tensor,
                 cand_id: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor, chunk: int,
                 cap: int) -> None:
    """Fill top_ids / top_logprobs [S, K] (K >= 1) after the sampler's pick (rf / ri hold its per-row results,
    si / sf state 0 of the top-logprobs search; cand_s / cand_id are the search's candidate buffers of `cap`
    per row; the chunk kernels cover `chunk` tokens each)."""
    rows, vocab = logits.shape
    num_top = top_ids.shape[1]
    chunks = triton.cdiv(vocab, chunk)
    work_args, raw_args = (logits, logits.stride(0)), (raw_logits, raw_logits.stride(0))
    run_passes(logits, raw_logits, temperature, si, sf, cand_s, cand_id, chunk, cap)
    _top_done_kernel[(rows,)](*work_args, *raw_args, vocab, temperature, ri, si, sf, cand_s, STATES=STATES, CAP=cap,
                              BLOCK=ROW_BLOCK, NB=NB, VALUE_PASSES=VALUE_PASSES, num_warps=4)
    padded = max(2, triton.next_power_of_2(num_top))
    slots = torch.empty(rows, chunks, padded, dtype=torch.int32, device=logits.device)
    _slots_kernel[(rows, chunks)](*work_args, *raw_args, vocab, temperature, use_raw, ri, slots, K=num_top,
                                  KP=padded, CHUNK=chunk, BLOCK=BLOCK, num_warps=4)
    n = max(32, triton.next_power_of_2(chunks * padded))
    _rank_kernel[(rows,)](*work_args, *raw_args, temperature, use_raw, rf, ri, slots, chunks * padded, top_ids,
                          top_logprobs, K=num_top, N=n, RB=32, num_warps=4)
