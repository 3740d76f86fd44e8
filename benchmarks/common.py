"""Shared helpers for the benchmarks: random checkpoints written straight from the device, timing, git facts."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from transformers import AutoConfig

from worker.models.moe import is_sparse_layer

MODELS = Path(__file__).parent / "models"  # copies of ../shared/models configs


def hf_names_and_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """Checkpoint-format tensor names and shapes of a Llama-family config (MoE: experts one by one)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    names = [("model.embed_tokens.weight", (v, h)), ("model.norm.weight", (h,))]
    if not config.tie_word_embeddings:
        names.append(("lm_head.weight", (v, h)))
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        names += [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                  (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                  (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        if config.model_type in ("qwen2", "qwen2_moe"):  # q, k, v biases
            names += [(p + f"self_attn.{x}_proj.bias", (n,)) for x, n in (("q", q), ("k", kv), ("v", kv))]
        if getattr(config, "num_experts", 0) and is_sparse_layer(config, layer):
            names += _moe_names(config, p + "mlp.")
        else:
            names += _mlp_names(p + "mlp.", h, i)
        if config.model_type in ("qwen3", "qwen3_moe"):
            names += [(p + "self_attn.q_norm.weight", (d,)), (p + "self_attn.k_norm.weight", (d,))]
    return names


def _mlp_names(p: str, h: int, i: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(p + "gate_proj.weight", (i, h)), (p + "up_proj.weight", (i, h)), (p + "down_proj.weight", (h, i))]


def _moe_names(config, p: str) -> list[tuple[str, tuple[int, ...]]]:
    h, e = config.hidden_size, config.num_experts
    names = [(p + "gate.weight", (e, h))]
    for k in range(e):
        names += _mlp_names(f"{p}experts.{k}.", h, config.moe_intermediate_size)
    if getattr(config, "shared_expert_intermediate_size", 0):
        names += _mlp_names(p + "shared_expert.", h, config.shared_expert_intermediate_size)
        names.append((p + "shared_expert_gate.weight", (1, h)))
    return names


def write_random_checkpoint(config_json: Path, out: Path, dtype=torch.bfloat16, seed: int = 0,
                            device: str = "cuda") -> Path:
    """A real sharded safetensors checkpoint of random weights (norms near 1), generated on `device`."""
    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model(**json.loads(config_json.read_text()))
    config.save_pretrained(out)
    gen = torch.Generator(device=device).manual_seed(seed)
    shards, current, size, index = [], {}, 0, {}
    for name, shape in hf_names_and_shapes(config):
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02
        current[name] = (t + 1.0 if name.endswith("norm.weight") else t).to(dtype).cpu()
        size += current[name].numel() * dtype.itemsize
        if size > 4 << 30:
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / file, metadata={"format": "pt"})
        index.update({name: file for name in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return out


def model_source(config_json: Path, checkpoint: Path, random_weights: bool, device: str = "cuda") -> dict:
    """Engine keyword arguments naming a benchmark's model. random_weights: `checkpoint` gets the config alone and
    the engine draws random weights on the device (load_format='dummy'; for models too large to write to the
    disk, e.g. Qwen3-30B-A3B's 61 GB); else the random checkpoint is written there first if it is missing."""
    if random_weights:
        checkpoint.mkdir(parents=True, exist_ok=True)
        AutoConfig.for_model(**json.loads(config_json.read_text())).save_pretrained(checkpoint)
        return dict(model=str(checkpoint), load_format="dummy")
    if not (checkpoint / "config.json").exists():
        write_random_checkpoint(config_json, checkpoint, device=device)
    return dict(model=str(checkpoint))


def median_time(fn: Callable[[], None], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of `fn` (CUDA synchronized around each call), warm-up calls excluded."""
    times = []
    for k in range(warmup + repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if k >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def git_commit() -> str:
    """The commit measured: $ROLLOUT_COMMIT (set where the tree travels without .git), else git's."""
    if os.environ.get("ROLLOUT_COMMIT"):
        return os.environ["ROLLOUT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"
