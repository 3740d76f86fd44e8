"""The Llama family decoder in kernel format: Llama, Qwen2 (qkv bias), Qwen3 (q/k norm), and their
mixture-of-experts variants Qwen2-MoE and Qwen3-MoE (see worker/models/moe.py).

Parameters are fused (`qkv_proj`, `gate_up_proj`, stacked experts `w13` / `w2`);
`load_weights` maps the Hugging Face checkpoint names (q_proj, k_proj, v_proj,
gate_proj, up_proj, experts.{e}.*) into their row ranges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from worker import kernels
from worker.attention import AttentionBackend, AttentionMetadata
from worker.models.layers import (MLP, FusedLinear, RMSNorm, RotaryEmbedding, RowParallelLinear, VocabParallel,
                                  default_weight_loader)
from worker.models.moe import Experts, SparseMoeBlock, is_sparse_layer, map_expert_name
from worker.parallel import TensorParallel


@dataclass
class ArchOptions:
    """What distinguishes the members of the family."""

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    mlp_bias: bool = False
    moe: bool = False  # sparse layers (config.num_experts, decoder_sparse_step, mlp_only_layers) hold experts
    shared_expert: bool = False  # Qwen2-MoE: plus a shared expert behind a sigmoid gate


@dataclass
class ForwardContext:
    """What every attention layer needs for one step."""

    backend: AttentionBackend
    meta: AttentionMetadata
    kv_caches: list[torch.Tensor]


# checkpoint projection -> (fused kernel parameter, shard id)
STACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
UNSTACKED = {fused_shard: proj for proj, fused_shard in STACKED.items()}


class Attention(nn.Module):
    """This rank's attention heads (all of them without tensor parallelism)."""

    def __init__(self, config, layer_idx: int, opts: ArchOptions, rotary: RotaryEmbedding, tp: TensorParallel):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = tp.split(config.num_attention_heads, "num_attention_heads")
        self.num_kv_heads = tp.split(config.num_key_value_heads, "num_key_value_heads")
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        q_size = config.num_attention_heads * self.head_dim
        kv_size = config.num_key_value_heads * self.head_dim
        shards = {"q": q_size, "k": kv_size, "v": kv_size}
        self.qkv_proj = FusedLinear(config.hidden_size, shards, opts.qkv_bias, tp)
        self.o_proj = RowParallelLinear(q_size, config.hidden_size, opts.o_bias, tp)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if opts.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if opts.qk_norm else None
        self.rotary = rotary

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = self.qkv_proj(x)
        if kernels.use_for(qkv):
            self._fused_norm_rope(positions, qkv)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if not kernels.use_for(qkv):
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary(positions, q, k)
        out = ctx.backend.forward(q, k, v, ctx.kv_caches[self.layer_idx], ctx.meta, self.scale)
        return self.o_proj(out.reshape(-1, q_size))

    def _fused_norm_rope(self, positions: torch.Tensor, qkv: torch.Tensor) -> None:
        from worker.kernels.fused import qk_norm_rope

        norm = self.q_norm is not None
        qk_norm_rope(qkv, positions, self.rotary.cos, self.rotary.sin, self.num_heads, self.num_kv_heads,
                     self.head_dim, self.q_norm.weight if norm else None, self.k_norm.weight if norm else None,
                     self.q_norm.eps if norm else 0.0)


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, opts: ArchOptions, rotary: RotaryEmbedding, tp: TensorParallel,
                 expert_parallel_size: int = 1):
        super().__init__()
        self.self_attn = Attention(config, layer_idx, opts, rotary, tp)
        if opts.moe and is_sparse_layer(config, layer_idx):
            self.mlp = SparseMoeBlock(config, tp, expert_parallel_size, opts.shared_expert)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, opts.mlp_bias, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: Optional[torch.Tensor],
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it); their sum is the layer's output."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(positions, h, ctx)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, config, opts: ArchOptions, max_positions: int, tp: TensorParallel, expert_parallel_size: int):
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rotary = RotaryEmbedding(head_dim, max_positions, rope_parameters(config))
        self.embed_tokens = VocabParallel(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, opts, rotary, tp, expert_parallel_size) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x, residual = self.embed_tokens.embed(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, ctx)
        return self.norm.add_forward(x, residual)[0]


def rope_parameters(config) -> dict:
    """Rope settings from a transformers config (v5 `rope_parameters` or v4 `rope_theta` + `rope_scaling`)."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


class CausalLM(nn.Module):
    """Decoder + LM head, with the checkpoint-name mapping for loading.

    With tensor parallelism (`tp.size > 1`) each rank holds its slices; loading
    takes full checkpoint tensors and keeps this rank's part. `expert_parallel_size`
    splits a MoE model's experts over groups of the ranks (see worker/models/moe.py).
    """

    def __init__(self, config, opts: ArchOptions, max_positions: int, tp: TensorParallel = TensorParallel(),
                 expert_parallel_size: int = 1):
        super().__init__()
        self.config = config
        self.tp = tp
        self.model = DecoderModel(config, opts, max_positions, tp, expert_parallel_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = VocabParallel(config.vocab_size, config.hidden_size, tp)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._aliases: Optional[dict[str, tuple[tuple[int, ...], list[str]]]] = None
        self._params: dict[str, nn.Parameter] = {}  # filled at the first load, after the memory pool placed them

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary (gathered from every rank)."""
        return self.lm_head.logits(hidden)

    def moe_blocks(self) -> list[SparseMoeBlock]:
        """The layers' expert blocks, in layer order (empty for a dense model)."""
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, SparseMoeBlock)]

    def record_routed_experts(self, buffer: Optional[torch.Tensor]) -> None:
        """Make every forward write the experts it routes each token to into `buffer`; None stops recording.

        `buffer`: int16 [max_tokens, len(moe_blocks()), top_k] (top_k = config.num_experts_per_tok), on the
        model's device; row i of a forward's rows 0 .. tokens - 1 is the forward's i-th input token, column j its
        j-th MoE layer, ids in descending routing weight order (global expert ids, also under expert
        parallelism). Writing needs no host sync and keeps the buffer's address (CUDA-graph safe: set it before
        capturing). Rows past the forward's token count keep their old values.
        """
        blocks = self.moe_blocks()
        if buffer is not None:
            top_k = blocks[0].top_k if blocks else 0
            if buffer.dim() != 3 or tuple(buffer.shape[1:]) != (len(blocks), top_k) or buffer.dtype != torch.int16:
                raise ValueError(f"the routed-experts buffer must be int16 [max_tokens, {len(blocks)}, {top_k}], got "
                                 f"{buffer.dtype} {list(buffer.shape)}")
        for j, block in enumerate(blocks):
            block.record = None if buffer is None else buffer[:, j]

    def canonical_name(self, name: str) -> str:
        """The checkpoint name a tensor is known by (a tied lm_head is the embedding)."""
        return "model.embed_tokens.weight" if self.tie_word_embeddings and name == "lm_head.weight" else name

    def map_name(self, name: str) -> tuple[str, object]:
        """Kernel parameter name and shard id (None for unfused parameters) of a checkpoint name."""
        name = self.canonical_name(name)
        expert = map_expert_name(name)
        if expert is not None:
            return expert
        for proj, (fused, shard) in STACKED.items():
            part = f".{proj}."
            if part in name:
                return name.replace(part, f".{fused}."), shard
        return name, None

    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every checkpoint-format tensor name this model loads, with its shape (a copy the caller may change).

        Experts are named one by one (`experts.{e}.gate_proj.weight`, ...); see `checkpoint_aliases` for the
        stacked names that may stand in for them.
        """
        if not self._shapes:
            self._shapes = self._compute_checkpoint_shapes()
        return dict(self._shapes)

    def checkpoint_aliases(self) -> dict[str, tuple[tuple[int, ...], list[str]]]:
        """Checkpoint names that stand for several `checkpoint_shapes` names: transformers' stacked experts
        (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), each with its shape and the names it covers."""
        if self._aliases is None:
            self._aliases = {}
            for name, module in self.named_modules():
                if isinstance(module, Experts):
                    self._aliases.update(module.stacked_entries(name))
        return self._aliases

    def covered_names(self, name: str) -> list[str]:
        """The `checkpoint_shapes` names a checkpoint tensor writes (several for a stacked-experts alias)."""
        match = map_expert_name(name)
        if match is not None and match[1][0] == "all":
            return self.checkpoint_aliases()[name][1]
        return [self.canonical_name(name)]

    def _compute_checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        params = dict(self.named_parameters())
        shapes: dict[str, tuple[int, ...]] = {}
        for name, param in params.items():
            owner = self.get_submodule(name.rsplit(".", 1)[0])
            if isinstance(owner, Experts):
                if name.endswith(".w13"):  # both stacked parameters are named once, with the first
                    shapes.update(owner.checkpoint_entries(name.rsplit(".", 1)[0]))
            elif isinstance(owner, FusedLinear):
                fused = name.split(".")[-2]
                for shard in owner.offsets:
                    ckpt = name.replace(f".{fused}.", f".{UNSTACKED[(fused, shard)]}.")
                    shapes[ckpt] = owner.shard_shape(param, shard)
            elif hasattr(owner, "checkpoint_shape"):
                shapes[name] = owner.checkpoint_shape(param)
            else:
                shapes[name] = tuple(param.shape)
        return shapes

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint-format tensors into the fused parameters; returns the names loaded.

        Names and shapes must already be validated against `checkpoint_shapes()`.
        Parameters must not be replaced after the first call (their table is kept).
        """
        if not self._params:
            self._params = dict(self.named_parameters())
        params = self._params
        loaded = set()
        for name, tensor in weights:
            target, shard = self.map_name(name)
            param = params[target]
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, tensor, shard)
            loaded.add(name)
        return loaded
