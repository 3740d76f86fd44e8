"""Tiny random Hugging Face checkpoints, shrunk from ../shared/models, saved with save_pretrained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config,
                          Qwen3MoeConfig)

from rollout.demo import quiet_transformers

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=384,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> (config class, architecture-specific fields)
VARIANTS = {
    "llama3": (LlamaConfig, dict(
        tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64),
    )),
    "llama-tied": (LlamaConfig, dict(tie_word_embeddings=True, rope_parameters=dict(rope_theta=10000.0))),
    "qwen2": (Qwen2Config, dict(tie_word_embeddings=True, rope_parameters=dict(rope_theta=1000000.0))),
    "qwen3": (Qwen3Config, dict(tie_word_embeddings=True, head_dim=32, rope_parameters=dict(rope_theta=1000000.0))),
    "qwen3-untied": (Qwen3Config, dict(tie_word_embeddings=False, head_dim=16, num_key_value_heads=1,
                                       rope_parameters=dict(rope_theta=1000000.0))),
    # shrunk from ../shared/models/qwen3-30b-a3b.json: 3 layers, the middle one dense (mlp_only_layers)
    "qwen3-moe": (Qwen3MoeConfig, dict(
        tie_word_embeddings=False, head_dim=16, num_hidden_layers=3, mlp_only_layers=[1], num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, rope_parameters=dict(rope_theta=1e6),
    )),
    # decoder_sparse_step=2: layer 1 sparse, layer 0 dense; no renormalisation of the top-k weights
    "qwen3-moe-tied": (Qwen3MoeConfig, dict(
        tie_word_embeddings=True, head_dim=16, decoder_sparse_step=2, num_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=16, norm_topk_prob=False, rope_parameters=dict(rope_theta=1e6),
    )),
    # shrunk from ../shared/models/qwen1.5-moe-a2.7b.json: shared expert behind a sigmoid gate
    "qwen2-moe": (Qwen2MoeConfig, dict(
        tie_word_embeddings=False, num_experts=8, num_experts_per_tok=4, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, norm_topk_prob=False, rope_parameters=dict(rope_theta=1e6),
    )),
    "qwen2-moe-tied": (Qwen2MoeConfig, dict(
        tie_word_embeddings=True, num_experts=4, num_experts_per_tok=1, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, norm_topk_prob=True, rope_parameters=dict(rope_theta=1e6),
    )),
}


def make_config(variant: str, **overrides):
    cls, fields = VARIANTS[variant]
    return cls(**{**TINY, **fields, **overrides})


def randomize(model: torch.nn.Module, seed: int, std: float = 0.25) -> None:
    """Random, non-zero values everywhere (biases and norm weights too), large enough for peaked logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * std
            param.copy_(1.0 + noise * 0.4 if "norm" in name else noise)


def save_checkpoint(path: Path, variant: str = "qwen3", seed: int = 0, **overrides) -> Path:
    """Build a random model of `variant`, save it as a real safetensors checkpoint, return the directory."""
    config = make_config(variant, **overrides)
    config.architectures = [config.architectures[0] if config.architectures else
                            type(config).__name__.replace("Config", "ForCausalLM")]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed)
    with quiet_transformers():
        model.save_pretrained(path)
    return Path(path)


def load_reference(path: Path):
    """The transformers model of a saved checkpoint, fp32, eval mode."""
    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


PROMPTS_06B = [[(37 * i + 11 * j) % 151000 for j in range(n)] for i, n in enumerate((5, 40, 1, 97))]


def save_qwen3_06b_shaped(path: Path, layers: int = 4) -> Path:
    """Qwen3-0.6B's widths (GQA 16/8, head_dim 128, its vocabulary) with `layers` layers and transformers' own
    random init (std 0.02), saved in bf16: realistic activation scales for bf16 comparisons."""
    shape = json.loads((Path(__file__).parents[1] / "benchmarks" / "models" / "qwen3-0.6b.json").read_text())
    config = AutoConfig.for_model(**{**shape, "num_hidden_layers": layers})
    torch.manual_seed(0)
    with quiet_transformers():
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    return Path(path)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint directory, to break or edit."""
    shutil.copytree(src, dst)
    return Path(dst)


def edit_json(path: Path, edit) -> Path:
    """Apply `edit` to the parsed JSON file at `path` (a dict, changed in place) and write it back."""
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def edit_tensors(checkpoint: Path, edit) -> Path:
    """Apply `edit` to the tensor dict of a single-file checkpoint (changed in place) and save it back."""
    tensors = load_file(checkpoint / "model.safetensors")
    edit(tensors)
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    return checkpoint


def shard_checkpoint(checkpoint: Path, shard_names: tuple[str, ...] = ("a.safetensors", "b.safetensors")) -> dict:
    """Split a single-file checkpoint over `shard_names` (relative paths) with an index; returns the index dict."""
    tensors = load_file(checkpoint / "model.safetensors")
    (checkpoint / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {name: shard_names[i * len(shard_names) // len(names)] for i, name in enumerate(names)}
    for shard in shard_names:
        (checkpoint / shard).parent.mkdir(parents=True, exist_ok=True)
        save_file({n: tensors[n] for n, s in weight_map.items() if s == shard}, checkpoint / shard,
                  metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": weight_map}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    return index
