"""The fused MoE kernels against the pure-torch experts computed in float64.

Runs under Triton's interpreter without CUDA (float32, small shapes), natively on the device machine (bf16, fp16,
fp32, up to 4096 tokens and 128 experts; `-m gpu`).
"""

import pytest
import torch

pytest.importorskip("triton")  # conftest selected the interpreter when there is no CUDA

from worker.kernels.moe import align, fused_experts  # noqa: E402
from worker.models.moe import reference_experts, route  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def problem(tokens, experts, top_k, hidden, inter, dtype, seed, unused=0):
    """Random activations and stacked experts; the router never picks the last `unused` experts."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    logits = torch.randn(tokens, experts, generator=gen) * 2
    if unused:
        logits[:, experts - unused :] = -1e4
    weights, ids = route(logits, top_k, renormalize=seed % 2 == 0)
    return [t.to(DEVICE, dtype) for t in (x, w13, w2, weights)] + [ids.to(DEVICE)]


def check(x, w13, w2, weights, ids, first_expert=0):
    got = fused_experts(x, w13, w2, weights, ids, first_expert)
    expected = reference_experts(*(t.double() for t in (x, w13, w2, weights)), ids, first_expert)
    tol = {torch.bfloat16: 3e-2, torch.float16: 4e-3}.get(x.dtype, 1e-4)
    assert got.dtype == x.dtype and got.shape == x.shape
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)


def test_align_groups_pairs_by_expert_in_padded_blocks():
    ids = torch.tensor([[3, 0], [3, 5], [0, 3]], device=DEVICE)  # experts 1, 2, 4, 6, 7 get no token
    rows, block_expert = align(ids, num_experts=8, first_expert=0, block_m=4)
    assert rows.numel() == 4 * block_expert.numel() and block_expert.numel() == -(-(6 + 6 * 3) // 4)
    rows, block_expert = rows.cpu().tolist(), block_expert.cpu().tolist()
    assert block_expert[:3] == [0, 3, 5] and set(block_expert[3:]) == {-1}
    assert rows[:12] == [1, 4, 6, 6, 0, 2, 5, 6, 3, 6, 6, 6]  # pair = token * top_k + slot; 6 = padding


@pytest.mark.parametrize("tokens,experts,top_k,unused", [
    (1, 8, 1, 0), (5, 8, 2, 3), (33, 16, 8, 4), (70, 128, 8, 100), (130, 64, 4, 0), (400, 8, 2, 1),
    (1024, 128, 8, 7), (4096, 16, 1, 2),
])
def test_fused_experts_match_reference(tokens, experts, top_k, unused):
    check(*problem(tokens, experts, top_k, 48, 40, torch.float32, seed=tokens, unused=unused))


def test_pairs_of_other_ranks_experts_contribute_nothing():
    """Expert parallelism: this rank holds experts 8..15 of 32; the reference drops the other pairs too."""
    x, w13, w2, weights, ids = problem(37, 32, 4, 32, 16, torch.float32, seed=3)
    check(x, w13[8:16], w2[8:16], weights, ids, first_expert=8)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 128, 8), (7, 60, 4), (256, 128, 8), (4096, 128, 8),
                                                  (1000, 8, 1), (3000, 64, 2)])
def test_fused_experts_native(dtype, tokens, experts, top_k):
    check(*problem(tokens, experts, top_k, 2048 if tokens < 4096 else 1024, 768, dtype, seed=tokens, unused=3))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_fused_experts_replay_in_a_cuda_graph():
    """Captured once, replayed with new routings and activations in the same buffers: same result as eager."""
    x, w13, w2, weights, ids = problem(64, 128, 8, 512, 256, torch.bfloat16, seed=1)
    fused_experts(x, w13, w2, weights, ids)  # compile before capturing
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(x, w13, w2, weights, ids)
    x2, _, _, weights2, ids2 = problem(64, 128, 8, 512, 256, torch.bfloat16, seed=2, unused=50)
    x.copy_(x2), weights.copy_(weights2), ids.copy_(ids2)
    graph.replay()
    torch.testing.assert_close(out, fused_experts(x, w13, w2, weights, ids), atol=0, rtol=0)
