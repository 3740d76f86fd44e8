"""The fused Triton ops and the fused sampler against transformers' modules and our torch sampler.

Runs under Triton's interpreter without CUDA (float32), natively on the device machine (bf16 too).
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # conftest selected the interpreter when there is no CUDA

from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb  # noqa: E402

from worker.kernels.fused import qk_norm_rope, rms_norm, silu_and_mul  # noqa: E402
from worker.kernels.sampling import fused_sample  # noqa: E402
from worker.models.layers import RotaryEmbedding  # noqa: E402
from worker.sampler import torch_sample  # noqa: E402

from sampling_reference import make_tensors  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if CUDA else [torch.float32]


def close(got, expected):
    """Equal up to one rounding of the dtype (reductions may sum in another order than torch's)."""
    tol = {torch.bfloat16: 2**-7, torch.float16: 2**-10}.get(got.dtype, 1e-5)
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def _hf_norm(size, dtype, seed):
    norm = Qwen3RMSNorm(size, eps=1e-6)
    norm.weight.data = torch.randn(size, generator=torch.Generator().manual_seed(seed)) * 0.3 + 1.0
    return norm.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_and_without_residual_matches_transformers(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 300, generator=gen) * 3).to(DEVICE, dtype)
    residual = torch.randn(5, 300, generator=gen).to(DEVICE, dtype)
    norm = _hf_norm(300, dtype, seed=1)
    out, none = rms_norm(x, norm.weight, 1e-6)
    assert none is None
    close(out, norm(x))
    out, total = rms_norm(x, norm.weight, 1e-6, residual)
    torch.testing.assert_close(total, x + residual, rtol=0, atol=0)
    close(out, norm(x + residual))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_torch(dtype):
    x = (torch.randn(3, 2 * 2500, generator=torch.Generator().manual_seed(2)) * 4).to(DEVICE, dtype)
    gate, up = x.chunk(2, dim=-1)
    close(silu_and_mul(x), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_rope_matches_transformers(dtype, qk_norm):
    heads, kv_heads, dim, tokens = 6, 2, 64, 7
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(DEVICE, dtype)
    positions = torch.tensor([0, 5, 17, 300, 2, 2, 1023], device=DEVICE)
    rotary = RotaryEmbedding(dim, 1024, {"rope_theta": 10000.0}).to(DEVICE)
    q_norm, k_norm = _hf_norm(dim, dtype, seed=4), _hf_norm(dim, dtype, seed=5)
    q, k, v = qkv.clone().split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k = q.reshape(tokens, heads, dim), k.reshape(tokens, kv_heads, dim)
    if qk_norm:
        q, k = q_norm(q), k_norm(k)
    cos, sin = rotary.cos[positions].to(dtype), rotary.sin[positions].to(dtype)
    q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    got = qkv.clone()
    qk_norm_rope(got, positions, rotary.cos, rotary.sin, heads, kv_heads, dim,
                 q_norm.weight if qk_norm else None, k_norm.weight if qk_norm else None, 1e-6)
    close(got[:, : heads * dim].view(tokens, heads, dim), q)
    close(got[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim), k)
    assert torch.equal(got[:, (heads + kv_heads) * dim :], v)


@pytest.mark.parametrize("vocab", [5003, 20011])  # one vocabulary chunk, and three
def test_fused_sampler_picks_the_torch_samplers_tokens(vocab):
    """Greedy and seeded rows at several temperatures, processed and raw logprobs, vocabularies of odd size."""
    rows = 12
    logits = (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(6)) * 3).to(DEVICE)
    t = make_tensors(rows, temperature=[0.0, 1.0, 0.7, 1.3] * 3, seeds=torch.arange(rows) * 104729 + (1 << 40),
                     steps=torch.arange(rows) * 3, raw=[r % 2 == 0 for r in range(rows)], vocab=vocab)
    t = type(t)(**{name: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for name, v in vars(t).items()})
    expected = torch_sample(logits, t)
    tokens = torch.empty(rows, dtype=torch.int64, device=DEVICE)
    logprobs = torch.empty(rows, dtype=torch.float32, device=DEVICE)
    fused_sample(logits, t.temperature, t.seeds, t.steps, t.use_raw, tokens, logprobs)
    assert torch.equal(tokens, expected.token_ids)
    assert len(set(tokens[1::4].tolist())) > 1  # seeded rows really sample
    torch.testing.assert_close(logprobs, expected.logprobs, atol=1e-4, rtol=0)
