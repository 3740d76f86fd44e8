"""Fused mixture-of-experts: token slots grouped by expert, two grouped GEMMs in Triton.

`fused_experts(x, w13, w2, weights, ids)` gives what `reference_experts` gives:
for each token, the routing-weighted sum of its experts' SiLU-gated MLPs.

1. `align`: the T * top_k (token, slot) pairs are sorted by expert, and each
   expert's group is padded to a multiple of BLOCK_M. The padded length is
   bounded by T * top_k + min(E, T * top_k) * (BLOCK_M - 1), so every buffer
   and grid has a size fixed by the token count: no host sync, CUDA-graph safe.
   Experts that receive no token get no block; unused blocks are marked -1.
2. `_w13_kernel`: each program computes a BLOCK_M x BLOCK_N tile of gate and up
   for one expert's pairs and writes SiLU(gate) * up (fp32 accumulation).
3. `_w2_kernel`: the down projection, scaled by each pair's routing weight.
4. The top_k rows of each token are summed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _block_m(pairs: int, num_experts: int) -> int:
    """Rows per block: small when each expert gets few pairs (decode), else larger for reuse."""
    return 16 if pairs <= 4 * num_experts else 64


def _block(size: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(size)))


def align(ids: torch.Tensor, num_experts: int, first_expert: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs grouped by (local) expert: (pair index per padded row, pairs count where padding; expert per block,
    -1 where unused). Pairs routed outside `first_expert ..` (other ranks' experts) get no row."""
    pairs = ids.numel()
    device = ids.device
    local = ids.flatten().to(torch.int64) - first_expert
    bins = torch.where((local >= 0) & (local < num_experts), local, num_experts)  # bin E: not this rank's
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, bins, torch.ones_like(bins))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    count_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(bins, stable=True)
    sorted_bins = bins[order]
    rank = torch.arange(pairs, device=device) - count_start[sorted_bins]
    bound = pairs + min(num_experts, pairs) * (block_m - 1)
    num_blocks = triton.cdiv(bound, block_m)
    start = torch.cat([padded_end.new_zeros(1), padded_end])[sorted_bins]  # padded start of each pair's expert
    position = torch.where(sorted_bins < num_experts, start + rank, num_blocks * block_m)  # dropped: a spare row
    rows = torch.full((num_blocks * block_m + 1,), pairs, dtype=torch.int32, device=device)
    rows.scatter_(0, position, order.to(torch.int32))
    block_start = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return rows[:-1], block_expert


@triton.jit
def _w13_kernel(x_ptr, w_ptr, out_ptr, rows_ptr, expert_ptr, pairs, hidden, inter, top_k,
                stride_x, stride_we, stride_wn, stride_out,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    block, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(expert_ptr + block).to(tl.int64)
    if expert < 0:
        return
    rows = tl.load(rows_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = rows < pairs
    tokens = (rows // top_k).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    w = w_ptr + expert * stride_we
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        a = tl.load(x_ptr + tokens[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_mask = k_ok[:, None] & col_ok[None, :]
        b_gate = tl.load(w + cols[None, :] * stride_wn + ks[:, None], mask=b_mask, other=0.0)
        b_up = tl.load(w + (cols[None, :] + inter) * stride_wn + ks[:, None], mask=b_mask, other=0.0)
        gate = tl.dot(a, b_gate, gate, input_precision=PRECISION)
        up = tl.dot(a, b_up, up, input_precision=PRECISION)
    h = gate * tl.sigmoid(gate) * up
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out, h.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _w2_kernel(h_ptr, w_ptr, out_ptr, weight_ptr, rows_ptr, expert_ptr, pairs, hidden, inter,
               stride_h, stride_we, stride_wn, stride_out,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    block, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(expert_ptr + block).to(tl.int64)
    if expert < 0:
        return
    rows = tl.load(rows_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = rows < pairs
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    w = w_ptr + expert * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < inter
        a = tl.load(h_ptr + rows64[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w + cols[None, :] * stride_wn + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    scale = tl.load(weight_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)
    out = out_ptr + rows64[:, None] * stride_out + cols[None, :]
    tl.store(out, (acc * scale[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                  first_expert: int = 0) -> torch.Tensor:
    """Routing-weighted sum of the experts' SiLU-gated MLPs for every token: [T, H] in x's dtype.

    `x` [T, H]; `w13` [E, 2 * I, H] (gate rows, then up rows); `w2` [E, H, I]; `weights`, `ids` [T, top_k]
    (global expert ids; pairs outside `first_expert .. first_expert + E - 1` contribute nothing).
    """
    tokens, hidden = x.shape
    num_experts, inter = w2.shape[0], w2.shape[2]
    top_k = ids.shape[1]
    pairs = tokens * top_k
    block_m = _block_m(pairs, num_experts)
    rows, block_expert = align(ids, num_experts, first_expert, block_m)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    h = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    out = torch.zeros(pairs, hidden, dtype=x.dtype, device=x.device)  # other ranks' pairs stay zero
    num_blocks = block_expert.numel()
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # float32: exact dots, not TF32
    bn, bk = _block(inter, 64), _block(hidden, 64)
    _w13_kernel[(num_blocks, triton.cdiv(inter, bn))](
        x, w13, h, rows, block_expert, pairs, hidden, inter, top_k,
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision)
    bn, bk = _block(hidden, 64), _block(inter, 64)
    _w2_kernel[(num_blocks, triton.cdiv(hidden, bn))](
        h, w2, out, weights.contiguous().view(-1), rows, block_expert, pairs, hidden, inter,
        h.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision)
    return out.view(tokens, top_k, hidden).sum(dim=1)
