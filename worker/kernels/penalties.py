"""The sampler's working copy of the logits: penalties applied (as vLLM, before temperature), bans set to -inf."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _penalize_kernel(logits_ptr, stride_row, out_ptr, counts_ptr, prompt_ptr, rep_ptr, pres_ptr, freq_ptr, vocab,
                     PENALTIES: tl.constexpr, BLOCK: tl.constexpr):
    """out = logits in float32; with PENALTIES, the formula of `worker.penalties.apply_penalties`."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < vocab
    x = tl.load(logits_ptr + row * stride_row + cols, mask=ok).to(tl.float32)
    if PENALTIES:
        count = tl.load(counts_ptr + row * vocab + cols, mask=ok, other=0)
        seen = (tl.load(prompt_ptr + row * vocab + cols, mask=ok, other=0) != 0) | (count > 0)
        rep = tl.where(seen, tl.load(rep_ptr + row), 1.0)
        x = tl.where(x > 0.0, tl.math.div_rn(x, rep), x * rep)
        x = x - tl.load(freq_ptr + row) * count.to(tl.float32)
        x = x - tl.load(pres_ptr + row) * (count > 0).to(tl.float32)
    tl.store(out_ptr + row * vocab + cols, x, mask=ok)


@triton.jit
def _ban_kernel(out_ptr, vocab, rows_ptr, cols_ptr, num, BLOCK: tl.constexpr):
    """out[row, col] = -inf for each pair; pairs with row < 0 are padding."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rows = tl.load(rows_ptr + i, mask=i < num, other=-1)
    cols = tl.load(cols_ptr + i, mask=i < num, other=0)
    tl.store(out_ptr + rows * vocab + cols, tl.full([BLOCK], float("-inf"), tl.float32), mask=rows >= 0)


def prepare_logits(logits: torch.Tensor, penalties, banned_rows: torch.Tensor,
                   banned_cols: torch.Tensor) -> torch.Tensor:
    """A float32 copy [S, V] of `logits` with `penalties` (a `worker.penalties.PenaltyTensors`, or None)
    applied and the (row, token) pairs of banned_rows / banned_cols ([N] int64, row < 0 = padding) at -inf."""
    rows, vocab = logits.shape
    out = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return out
    p: Optional[object] = penalties
    args = (out,) * 5 if p is None else (p.output_counts, p.prompt_mask, p.repetition, p.presence, p.frequency)
    _penalize_kernel[(rows, triton.cdiv(vocab, BLOCK))](logits, logits.stride(0), out, *args, vocab,
                                                        PENALTIES=p is not None, BLOCK=BLOCK, num_warps=4)
    if banned_rows.numel():
        _ban_kernel[(triton.cdiv(banned_rows.numel(), 256),)](out, vocab, banned_rows, banned_cols,
                                                              banned_rows.numel(), BLOCK=256, num_warps=4)
    return out
