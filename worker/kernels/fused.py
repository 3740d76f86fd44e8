"""Fused small ops of the decoder layers, rounded like transformers' eager bf16 / fp16 modules.

Each replaces several elementwise torch kernels (and their memory round trips)
with one launch: residual add + RMSNorm, SiLU-and-mul, and per-head q/k RMSNorm
+ rotary embedding applied in place on the fused qkv projection's output.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, out_ptr, res_out_ptr, w_ptr, stride_x, stride_res, stride_out, eps,
                     N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # offsets below can pass 2**31
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0).to(tl.float32))
        x = x.to(out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * N + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
    normed = (xf * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """RMSNorm of `x` [T, N] (of `x + residual` when given); returns (normed, the new residual or None)."""
    rows, n = x.shape
    out = torch.empty((rows, n), device=x.device, dtype=x.dtype)
    res_out = torch.empty_like(out) if residual is not None else out
    res = residual if residual is not None else x
    _rms_norm_kernel[(rows,)](x, res, out, res_out, weight, x.stride(0), res.stride(0), out.stride(0), eps,
                              N=n, BLOCK=triton.next_power_of_2(n), HAS_RESIDUAL=residual is not None,
                              num_warps=4 if n <= 4096 else 8)
    return out, (res_out if residual is not None else None)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # offsets below can pass 2**31
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + N + offs, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * N + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for a fused [T, 2 * I] gate_up projection; returns [T, I]."""
    rows, width = x.shape
    n = width // 2
    out = torch.empty((rows, n), device=x.device, dtype=x.dtype)
    block = min(2048, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](x, out, x.stride(0), N=n, BLOCK=block, num_warps=4)
    return out


@triton.jit
def _qk_norm_rope_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, stride_t, stride_pos, eps,
                         NUM_Q_HEADS: tl.constexpr, NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr,
                         HALF: tl.constexpr, HAS_NORM: tl.constexpr):
    """One token: every q and k head gets its optional RMSNorm, then neox rotary, in place."""
    token = tl.program_id(0).to(tl.int64)  # offsets below can pass 2**31
    heads = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, HALF)
    mask = (heads < NUM_HEADS)[:, None]
    base = qkv_ptr + token * stride_t + heads[:, None] * (2 * HALF) + offs[None, :]
    dtype = qkv_ptr.dtype.element_ty
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
        is_q = (heads < NUM_Q_HEADS)[:, None]
        w1 = tl.where(is_q, tl.load(qw_ptr + offs)[None, :], tl.load(kw_ptr + offs)[None, :]).to(tl.float32)
        w2 = tl.where(is_q, tl.load(qw_ptr + HALF + offs)[None, :], tl.load(kw_ptr + HALF + offs)[None, :])
        x1 = (w1 * (x1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x2 = (w2.to(tl.float32) * (x2 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    pos = tl.load(pos_ptr + token * stride_pos)
    cos = tl.load(cos_ptr + pos * (2 * HALF) + offs).to(dtype).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * (2 * HALF) + offs).to(dtype).to(tl.float32)[None, :]
    out1 = (x1 * cos).to(dtype).to(tl.float32) + (-x2 * sin).to(dtype).to(tl.float32)
    out2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    tl.store(base, out1.to(dtype), mask=mask)
    tl.store(base + HALF, out2.to(dtype), mask=mask)


def qk_norm_rope(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 num_heads: int, num_kv_heads: int, head_dim: int, q_weight: Optional[torch.Tensor],
                 k_weight: Optional[torch.Tensor], eps: float) -> None:
    """In place on `qkv` [T, (H + 2 Hkv) * D]: per-head q/k RMSNorm (when weights are given), then rotary.

    `cos` / `sin` are the [max_positions, D] tables (each half repeated), indexed by `positions` [T].
    """
    assert qkv.stride(1) == 1 and head_dim % 2 == 0 and (head_dim // 2) & (head_dim // 2 - 1) == 0
    has_norm = q_weight is not None
    qw = q_weight if has_norm else cos
    kw = k_weight if has_norm else cos
    heads = num_heads + num_kv_heads
    _qk_norm_rope_kernel[(qkv.shape[0],)](
        qkv, positions, cos, sin, qw, kw, qkv.stride(0), positions.stride(0), eps,
        NUM_Q_HEADS=num_heads, NUM_HEADS=heads, BLOCK_H=triton.next_power_of_2(heads), HALF=head_dim // 2,
        HAS_NORM=has_norm, num_warps=4,
    )
