"""Routing replay: make a transformers MoE forward use the experts the sampler chose.

The engine records, for every token and MoE layer, the top-k experts its router
picked (int16 [tokens, moe_layers, top_k]). A trainer recomputing logprobs with
its own router may pick other experts for near-tied tokens, and the two
policies then differ by more than the weights do (Qwen3-30B-A3B GRPO runs
collapse without replay, Megatron-LM #4168). Inside `replay_routing`, each
router of a transformers Qwen3-MoE or Qwen2-MoE model keeps its logits (and so
its gradient) but takes the given experts: their weights are the softmax
probabilities of those experts, renormalised when the config says
`norm_topk_prob`, exactly as the model weighs its own choices.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def moe_routers(model: nn.Module) -> list[nn.Module]:
    """The top-k routers of a transformers Qwen3-MoE / Qwen2-MoE model (DDP / compile wrappers looked through),
    in layer order."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    return [m for m in model.modules() if isinstance(m, (Qwen3MoeTopKRouter, Qwen2MoeTopKRouter))]


@contextlib.contextmanager
def replay_routing(model: nn.Module, routed_experts) -> Iterator[None]:
    """Within the block, `model`'s forwards route every token to the given experts.

    `routed_experts`: integer expert ids (a tensor or array), [tokens, moe_layers, top_k] or
    [batch, seq, moe_layers, top_k], for exactly the tokens of the forward (batch x seq flattened in order, padding
    included: give any valid ids there), e.g. the engine's `Sample.routed_experts` of prompt + completion. Raises
    ValueError if the shape does not fit the model or an id is not an expert.
    """
    routes = torch.as_tensor(routed_experts).to(torch.int64)
    routers = moe_routers(model)
    if not routers:
        raise ValueError("the model has no Qwen3-MoE / Qwen2-MoE routers to replay")
    layers, top_k, experts = len(routers), routers[0].top_k, routers[0].num_experts
    if routes.dim() not in (3, 4) or tuple(routes.shape[-2:]) != (layers, top_k):
        raise ValueError(f"routed_experts must be [tokens, {layers}, {top_k}] or [batch, seq, {layers}, {top_k}] "
                         f"(MoE layers, experts per token), got {list(routes.shape)}")
    if routes.numel() and (routes.min() < 0 or routes.max() >= experts):
        raise ValueError(f"routed_experts holds ids outside 0..{experts - 1}")
    routes = routes.reshape(-1, layers, top_k)
    handles = [router.register_forward_hook(_replay_hook(routes[:, j])) for j, router in enumerate(routers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _replay_hook(ids: torch.Tensor):
    def hook(router: nn.Module, args, output):
        logits = output[0]
        if logits.shape[0] != ids.shape[0]:
            raise ValueError(f"routed_experts covers {ids.shape[0]} tokens, the forward has {logits.shape[0]}")
        chosen = ids.to(logits.device)
        weights = torch.softmax(logits, dim=-1, dtype=torch.float32).gather(1, chosen)
        if router.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype), chosen
    return hook
