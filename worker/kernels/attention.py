"""Triton paged attention: a varlen kernel for prefill / mixed steps and a split-KV decode kernel.

Both read keys and values through the block table of each sequence from a cache
laid out [num_blocks, block_size, num_kv_heads, head_dim] (keys and values
separately). Grouped-query heads are packed: one program handles every query
head of one KV head, so each key tile is loaded once and fed to `tl.dot` with
all of them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])  # they change from step to step: no recompiles
def _varlen_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, tile_starts_ptr,
    num_seqs, scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: BLOCK_Q query tokens of one sequence x the GROUP query heads of one KV head."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    lo = tile * 0  # binary search: seq = how many sequences' tiles end at or before `tile`
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        before = tl.load(tile_starts_ptr + 1 + mid) <= tile
        lo = tl.where(before, mid + 1, lo)
        hi = tl.where(before, hi, mid)
    seq = lo
    if seq >= num_seqs:
        return
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    first = (tile - tl.load(tile_starts_ptr + seq)) * BLOCK_Q

    rows = tl.arange(0, BLOCK_Q * BLOCK_G)
    token = first + rows // BLOCK_G
    head = kv_head * GROUP + rows % BLOCK_G
    row_ok = (token < q_len) & (rows % BLOCK_G < GROUP)
    q_pos = seq_len - q_len + token
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_off = (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    m = tl.full([BLOCK_Q * BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], tl.float32)
    kv_end = tl.minimum(seq_len, seq_len - q_len + first + BLOCK_Q)
    for start in range(0, kv_end, TILE):
        pos = start + tl.arange(0, TILE)
        pos_ok = pos < kv_end
        block = tl.load(block_tables_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=pos_ok, other=0)
        kv_off = block * stride_kb + (pos % BLOCK_SIZE) * stride_ks + kv_head * stride_kh
        kv_mask = pos_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        visible = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        v = tl.load(v_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    o_off = (q_start + token)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit(do_not_specialize=["stride_bt"])
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, lse_ptr, block_tables_ptr, seq_lens_ptr, scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: one split of one sequence's context, for the query heads of one KV head.

    With SPLITS == 1 the result goes straight to `out`; otherwise each split writes
    its normalised partial output and log-sum-exp (base 2) for `_merge_kernel`.
    """
    seq = tl.program_id(0).to(tl.int64)  # offsets below can pass 2**31
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    chunk = tl.cdiv(tl.cdiv(seq_len, SPLITS), TILE) * TILE
    begin = split * chunk
    end = tl.minimum(begin + chunk, seq_len)

    heads = tl.arange(0, BLOCK_G)
    head_ok = heads < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_heads = kv_head * GROUP + heads
    q_mask = head_ok[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + seq * stride_qt + q_heads[:, None] * stride_qh + dims[None, :], mask=q_mask, other=0.0)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(begin, end, TILE):
        pos = start + tl.arange(0, TILE)
        pos_ok = pos < end
        block = tl.load(block_tables_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=pos_ok, other=0)
        kv_off = block * stride_kb + (pos % BLOCK_SIZE) * stride_ks + kv_head * stride_kh
        kv_mask = pos_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(pos_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        v = tl.load(v_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    if SPLITS == 1:
        o_off = seq * stride_ot + q_heads[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        row = (seq * (GROUP * tl.num_programs(1)) + q_heads) * SPLITS + split
        tl.store(part_ptr + row[:, None] * BLOCK_D + dims[None, :], out, mask=q_mask)
        lse = tl.where(l == 0.0, float("-inf"), m + tl.log2(tl.where(l == 0.0, 1.0, l)))
        tl.store(lse_ptr + row, lse, mask=head_ok)


@triton.jit
def _merge_kernel(
    part_ptr, lse_ptr, out_ptr, stride_ot, stride_oh, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr,
):
    """Combine the SPLITS partial outputs of one (sequence, query head) by their log-sum-exps."""
    seq = tl.program_id(0).to(tl.int64)  # offsets below can pass 2**31
    head = tl.program_id(1)
    row = (seq * num_heads + head) * SPLITS
    splits = tl.arange(0, SPLITS)
    lse = tl.load(lse_ptr + row + splits)
    top = tl.max(lse, axis=0)
    weight = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top)))
    dims = tl.arange(0, BLOCK_D)
    parts = tl.load(part_ptr + (row + splits)[:, None] * BLOCK_D + dims[None, :])
    total = tl.sum(weight, axis=0)
    out = tl.sum(parts * weight[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


def _pow2(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(n))


def _precision(q: torch.Tensor) -> str:
    """float32 runs exact float32 dots (not TF32); bf16 / fp16 use the tensor cores natively."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_kt, stride_vt, stride_slot,
                     WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """Write one token's keys and values (all KV heads) to its cache slot; slot < 0 is skipped."""
    token = tl.program_id(0).to(tl.int64)  # offsets below can pass 2**31
    slot = tl.load(slot_ptr + token)
    if slot < 0:
        return
    offs = tl.arange(0, BLOCK)
    mask = offs < WIDTH
    k = tl.load(k_ptr + token * stride_kt + offs, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + offs, mask=mask)
    tl.store(k_cache_ptr + slot * stride_slot + offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * stride_slot + offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v [T, Hkv, D] (heads and dims contiguous) into the caches at `slot_mapping` (-1 = skip)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    width = num_kv_heads * head_dim
    assert k.stride(1) == v.stride(1) == head_dim and k.stride(2) == v.stride(2) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    _store_kv_kernel[(num_tokens,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0), width,
                                    WIDTH=width, BLOCK=_pow2(width), num_warps=4)


def varlen_tile_rows(num_heads: int, num_kv_heads: int) -> int:
    """Query tokens per program of the varlen kernel (64 packed rows: tokens x heads of a KV head)."""
    return max(1, 64 // _pow2(num_heads // num_kv_heads))


def paged_varlen_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, tile_starts: torch.Tensor, scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Causal attention of the step's tokens q [T, H, D] over their paged contexts, into `out`.

    `tile_starts` [B + 1] is the exclusive cumulative count of `varlen_tile_rows` tiles per sequence.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.numel()
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_q = varlen_tile_rows(num_heads, num_kv_heads)
    grid = (triton.cdiv(num_tokens, block_q) + num_seqs, num_kv_heads)
    _varlen_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, tile_starts, num_seqs, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, BLOCK_G=_pow2(group), BLOCK_Q=block_q, HEAD_DIM=head_dim, BLOCK_D=_pow2(head_dim, 16),
        BLOCK_SIZE=block_size, TILE=64, PRECISION=_precision(q), num_warps=4,
    )
    return out


def decode_splits(num_seqs: int, num_kv_heads: int, num_sms: int, max_splits: int = 16) -> int:
    """Splits of each context so that the decode grid has about two programs per SM (a power of two)."""
    programs = num_seqs * num_kv_heads
    splits = 1
    while splits < max_splits and programs * splits < 2 * num_sms:
        splits *= 2
    return splits


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, out: torch.Tensor, splits: int,
) -> torch.Tensor:
    """Attention of one query token per sequence (q [B, H, D]) over its paged context, into `out`.

    Rows with seq_len 0 (padding) produce zeros. `splits` (a power of two) divides each
    context into that many parts attended in parallel and merged.
    """
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_d = _pow2(head_dim, 16)
    part = lse = out
    if splits > 1:
        part = torch.empty(num_seqs * num_heads * splits, block_d, device=q.device, dtype=torch.float32)
        lse = torch.empty(num_seqs * num_heads * splits, device=q.device, dtype=torch.float32)
    _decode_kernel[(num_seqs, num_kv_heads, splits)](
        q, k_cache, v_cache, out, part, lse, block_tables, seq_lens, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, BLOCK_G=_pow2(group, 16), HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        TILE=64, SPLITS=splits, PRECISION=_precision(q), num_warps=4,
    )
    if splits > 1:
        _merge_kernel[(num_seqs, num_heads)](
            part, lse, out, out.stride(0), out.stride(1), num_heads,
            HEAD_DIM=head_dim, BLOCK_D=block_d, SPLITS=splits, num_warps=4,
        )
    return out
