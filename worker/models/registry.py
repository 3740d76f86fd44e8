"""Which model class serves which checkpoint architecture."""

from __future__ import annotations

from typing import Optional

from worker.errors import UnsupportedArchitectureError
from worker.models.llama import ArchOptions, CausalLM
from worker.models.moe import is_sparse_layer
from worker.parallel import TensorParallel


def _llama(config) -> ArchOptions:
    bias = bool(getattr(config, "attention_bias", False))
    return ArchOptions(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(config, "mlp_bias", False)))


def _qwen2(config) -> ArchOptions:
    return ArchOptions(qkv_bias=True)


def _qwen3(config) -> ArchOptions:
    bias = bool(getattr(config, "attention_bias", False))
    return ArchOptions(qkv_bias=bias, o_bias=bias, qk_norm=True)


def _qwen2_moe(config) -> ArchOptions:
    return ArchOptions(qkv_bias=bool(getattr(config, "qkv_bias", True)), moe=True, shared_expert=True)


def _qwen3_moe(config) -> ArchOptions:
    bias = bool(getattr(config, "attention_bias", False))
    return ArchOptions(qkv_bias=bias, o_bias=bias, qk_norm=True, moe=True)


ARCHITECTURES = {
    "LlamaForCausalLM": _llama,
    "Qwen2ForCausalLM": _qwen2,
    "Qwen3ForCausalLM": _qwen3,
    "Qwen2MoeForCausalLM": _qwen2_moe,
    "Qwen3MoeForCausalLM": _qwen3_moe,
}


def build_model(config, max_positions: int, tp: TensorParallel = TensorParallel(),
                expert_parallel_size: int = 1) -> CausalLM:
    """Instantiate (uninitialised) the kernel-format model for a transformers config (this rank's part)."""
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return CausalLM(config, ARCHITECTURES[name](config), max_positions, tp, expert_parallel_size)
    raise UnsupportedArchitectureError(
        f"checkpoint architectures {names or 'not set'} are not supported; supported: {', '.join(ARCHITECTURES)}"
    )


def routed_experts_shape(config) -> Optional[tuple[int, int, int]]:
    """(MoE layers, top_k, num_experts) of a mixture-of-experts checkpoint's config; None for a dense model."""
    names = [n for n in getattr(config, "architectures", None) or [] if n in ARCHITECTURES]
    if not names or not ARCHITECTURES[names[0]](config).moe:
        return None
    layers = sum(is_sparse_layer(config, i) for i in range(config.num_hidden_layers))
    return (layers, config.num_experts_per_tok, config.num_experts) if layers else None
