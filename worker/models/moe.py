"""Mixture-of-experts blocks (Qwen3-MoE, Qwen2-MoE): a softmax top-k router, stacked experts, a shared expert.

Kernel format: each layer's experts are stacked, `experts.w13` [E, 2 * I, H] (every
expert's gate rows, then its up rows) and `experts.w2` [E, H, I]. Checkpoint
format: the per-expert tensors of published checkpoints
(`mlp.experts.{e}.gate_proj.weight`, `up_proj`, `down_proj`) or the stacked
tensors of transformers' own modules (`mlp.experts.gate_up_proj` [E, 2 * I, H],
`mlp.experts.down_proj` [E, H, I], what a trainer's `named_parameters` gives).

Parallelism: the tensor-parallel group of `tp.size` ranks is split into
`expert_parallel_size` groups of experts; within one, the intermediate dimension
is split over `tp.size // expert_parallel_size` ranks. Every rank sees every
token (the attention is tensor parallel), computes its experts' partial sums,
and one all-reduce combines them.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from worker import kernels
from worker.models.layers import MLP
from worker.parallel import TensorParallel

EXPERT_NAME = re.compile(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
STACKED_NAME = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj)")
PART = {"gate_proj": "w13", "up_proj": "w13", "down_proj": "w2", "gate_up_proj": "w13"}


def is_sparse_layer(config, layer_idx: int) -> bool:
    """Whether decoder layer `layer_idx` has experts (transformers' rule: `mlp_only_layers`, `decoder_sparse_step`)."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or []) and config.num_experts > 0
            and (layer_idx + 1) % step == 0)


def map_expert_name(name: str) -> Optional[tuple[str, tuple[object, str]]]:
    """Kernel parameter and shard id ((expert or "all", projection)) of a checkpoint expert tensor, else None."""
    match = EXPERT_NAME.fullmatch(name)
    if match:
        prefix, expert, proj = match.groups()
        return f"{prefix}.{PART[proj]}", (int(expert), proj)
    match = STACKED_NAME.fullmatch(name)
    if match:
        prefix, proj = match.groups()
        return f"{prefix}.{PART[proj]}", ("all", proj)
    return None


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing like transformers' router: (weights in the logits' dtype, expert ids), [T, top_k] each."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


def reference_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor, first_expert: int = 0) -> torch.Tensor:
    """The experts' weighted sum in pure torch (the oracle and the CPU path), expert by expert like transformers.

    `w13`, `w2`: the stacked experts `first_expert ..`; token slots routed to other experts contribute nothing.
    """
    out = torch.zeros_like(x)
    local = ids - first_expert
    for e in range(w13.shape[0]):
        token, slot = torch.where(local == e)
        if token.numel() == 0:
            continue
        gate, up = F.linear(x[token], w13[e]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, w2[e]) * weights[token, slot, None]
        out.index_add_(0, token, h.to(out.dtype))
    return out


class Experts(nn.Module):
    """This rank's experts of one layer, stacked: `w13` [E_local, 2 * I_local, H], `w2` [E_local, H, I_local]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, tp: TensorParallel,
                 expert_parallel_size: int):
        super().__init__()
        ep = expert_parallel_size
        if ep < 1 or tp.size % ep:
            raise ValueError(f"expert_parallel_size={ep} must divide tensor_parallel_size={tp.size}")
        if num_experts % ep:
            raise ValueError(f"expert_parallel_size={ep} must divide num_experts ({num_experts})")
        inner = tp.size // ep  # ranks sharing one group of experts, each with a slice of the intermediate dim
        if intermediate_size % inner:
            raise ValueError(f"tensor_parallel_size / expert_parallel_size = {inner} must divide "
                             f"moe_intermediate_size ({intermediate_size})")
        self.num_experts, self.hidden, self.full_inter = num_experts, hidden_size, intermediate_size
        self.local = num_experts // ep
        self.first = (tp.rank // inner) * self.local
        self.inter = intermediate_size // inner
        self.inter_start = (tp.rank % inner) * self.inter
        self.w13 = nn.Parameter(torch.empty(self.local, 2 * self.inter, hidden_size))
        self.w2 = nn.Parameter(torch.empty(self.local, hidden_size, self.inter))
        self.w13.weight_loader = self.w2.weight_loader = self.load

    def checkpoint_entries(self, prefix: str) -> dict[str, tuple[int, ...]]:
        """Per-expert checkpoint names (every expert of the layer, not just this rank's) with their shapes."""
        shapes = {"gate_proj": (self.full_inter, self.hidden), "up_proj": (self.full_inter, self.hidden),
                  "down_proj": (self.hidden, self.full_inter)}
        return {f"{prefix}.{e}.{proj}.weight": shape for e in range(self.num_experts) for proj, shape in shapes.items()}

    def stacked_entries(self, prefix: str) -> dict[str, tuple[tuple[int, ...], list[str]]]:
        """transformers' stacked names, each with its shape and the per-expert names it stands for."""
        e, i, h = self.num_experts, self.full_inter, self.hidden
        return {
            f"{prefix}.gate_up_proj": ((e, 2 * i, h), [f"{prefix}.{k}.{p}.weight" for k in range(e)
                                                       for p in ("gate_proj", "up_proj")]),
            f"{prefix}.down_proj": ((e, h, i), [f"{prefix}.{k}.down_proj.weight" for k in range(e)]),
        }

    def load(self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[object, str]) -> None:
        """Copy one checkpoint tensor (an expert's projection, or a stacked one) into this rank's slices."""
        expert, proj = shard
        start, size = self.inter_start, self.inter
        if expert == "all":
            mine = loaded.narrow(0, self.first, self.local)
            if proj == "down_proj":
                param.data.copy_(mine.narrow(2, start, size))
            else:
                gate, up = mine.chunk(2, dim=1)
                param.data[:, :size].copy_(gate.narrow(1, start, size))
                param.data[:, size:].copy_(up.narrow(1, start, size))
            return
        e = expert - self.first
        if not 0 <= e < self.local:
            return  # another rank's expert
        if proj == "down_proj":
            param.data[e].copy_(loaded.narrow(1, start, size))
        else:
            rows = slice(0, size) if proj == "gate_proj" else slice(size, 2 * size)
            param.data[e, rows].copy_(loaded.narrow(0, start, size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum of the routed experts' outputs for every token."""
        if kernels.use_for(x):
            from worker.kernels.moe import fused_experts

            return fused_experts(x, self.w13, self.w2, weights, ids, self.first)
        return reference_experts(x, self.w13, self.w2, weights, ids, self.first)


class SparseMoeBlock(nn.Module):
    """Router (`gate`), experts and, for Qwen2-MoE, a shared expert scaled by a sigmoid gate.

    `record`: when set (see `CausalLM.record_routed_experts`), an int16 [max_tokens, top_k] view that every
    forward fills with the expert ids chosen for its tokens (rows 0 .. tokens - 1).
    """

    def __init__(self, config, tp: TensorParallel, expert_parallel_size: int, shared_expert: bool):
        super().__init__()
        self.tp = tp
        self.top_k = config.num_experts_per_tok
        self.renormalize = bool(getattr(config, "norm_topk_prob", False))
        if not 1 <= self.top_k <= config.num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} must be between 1 and num_experts "
                             f"({config.num_experts})")
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size, tp,
                               expert_parallel_size)
        self.shared_expert = self.shared_expert_gate = None
        if shared_expert:
            self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size, False, tp,
                                     reduce=False)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.record: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(F.linear(x, self.gate.weight), self.top_k, self.renormalize)
        if self.record is not None:
            self.record[: x.shape[0]].copy_(ids)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(F.linear(x, self.shared_expert_gate.weight)) * self.shared_expert(x)
        return self.tp.all_reduce(out)
