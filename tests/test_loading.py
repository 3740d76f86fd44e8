"""Checkpoint loading (single file, sharded), clear errors for bad checkpoints, in-process weight updates."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import load_reference, make_config, randomize
from rollout import CheckpointError, RolloutEngine, SamplingParams, UnsupportedArchitectureError
from transformers import AutoModelForCausalLM

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=True)
PROMPTS = [[4, 8, 15, 16, 23, 42], [99] * 9]


def engine_for(path, **config):
    return RolloutEngine(model=str(path), device="cpu", num_kv_blocks=64, **config)


def greedy(engine):
    return [o.samples[0].token_ids for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]


def rewrite(src, dst, edit):
    """Copy a single-file checkpoint, editing its tensor dict."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_sharded_checkpoint_loads_like_single_file(checkpoint_dir, tmp_path):
    single = checkpoint_dir("llama3")
    load_reference(single).save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    assert greedy(engine_for(tmp_path / "sharded")) == greedy(engine_for(single))


def test_missing_tensor_is_named(checkpoint_dir, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"
    bad = rewrite(checkpoint_dir("qwen3"), tmp_path / "bad", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing 1 tensor.*{name}"):
        engine_for(bad)


def test_mismatched_and_unexpected_tensors_are_named(checkpoint_dir, tmp_path):
    def edit(t):
        t["model.norm.weight"] = torch.ones(7)
        t["model.layers.0.mlp.extra.weight"] = torch.ones(3)

    bad = rewrite(checkpoint_dir("qwen3"), tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as err:
        engine_for(bad)
    assert "model.norm.weight: expected shape [64], got [7]" in str(err.value)
    assert "unexpected 1 tensor(s)" in str(err.value) and "mlp.extra.weight" in str(err.value)


def test_unsupported_architecture_names_supported_ones(checkpoint_dir, tmp_path):
    path = tmp_path / "gpt"
    shutil.copytree(checkpoint_dir("qwen3"), path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        engine_for(path)


def test_no_safetensors_is_a_clear_error(checkpoint_dir, tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    shutil.copy(checkpoint_dir("qwen3") / "config.json", path)
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        engine_for(path)


def trainer_state(seed):
    """Checkpoint-format weights of another random model of the same shape (what a trainer would send)."""
    model = AutoModelForCausalLM.from_config(make_config("qwen3"), dtype=torch.float32)
    randomize(model, seed)
    return model


def test_load_weights_equals_fresh_engine_and_bumps_version(checkpoint_dir, tmp_path):
    engine = engine_for(checkpoint_dir("qwen3"))
    before = greedy(engine)
    trainer = trainer_state(seed=7)
    assert engine.load_weights(trainer.state_dict().items()) == 1
    trainer.save_pretrained(tmp_path / "new")
    fresh = engine_for(tmp_path / "new")
    after = greedy(engine)
    assert after == greedy(fresh) and after != before
    assert engine.weight_version == 1
    assert all(s.weight_version == 1 for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False) for s in o.samples)
    assert engine.load_weights(trainer.state_dict().items(), version=5) == 5


def test_partial_update_changes_only_given_tensors(checkpoint_dir):
    engine = engine_for(checkpoint_dir("qwen3"))
    trainer = trainer_state(seed=8)
    name = "model.layers.0.self_attn.v_proj.weight"
    engine.load_weights([(name, trainer.state_dict()[name])])
    params = dict(engine.worker.model.named_parameters())
    q_rows = engine.worker.model.model.layers[0].self_attn.num_heads * engine.worker.model.model.layers[0].self_attn.head_dim
    kv = trainer.state_dict()[name].shape[0]
    fused = params["model.layers.0.self_attn.qkv_proj.weight"]
    assert torch.equal(fused[q_rows + kv:], trainer.state_dict()[name])
    original = load_reference(checkpoint_dir("qwen3")).state_dict()
    assert torch.equal(fused[:q_rows], original["model.layers.0.self_attn.q_proj.weight"])


def test_rejected_update_leaves_old_weights_serving(checkpoint_dir):
    engine = engine_for(checkpoint_dir("qwen3"))
    before = greedy(engine)
    state = dict(trainer_state(seed=9).state_dict())
    state["model.layers.1.mlp.down_proj.weight"] = torch.randn(5, 5)
    with pytest.raises(CheckpointError, match="down_proj.weight: expected shape"):
        engine.load_weights(state.items())
    with pytest.raises(CheckpointError, match="unexpected.*nonsense"):
        engine.load_weights([("nonsense.weight", torch.randn(3))])
    with pytest.raises(CheckpointError, match="floating point"):
        engine.load_weights([("model.norm.weight", torch.ones(64, dtype=torch.int64))])
    with pytest.raises(ValueError, match="not newer"):
        engine.load_weights(trainer_state(seed=9).state_dict().items(), version=0)
    assert engine.weight_version == 0
    assert greedy(engine) == before


def test_update_invalidates_prefix_cache(checkpoint_dir, tmp_path):
    engine = engine_for(checkpoint_dir("qwen3"), block_size=4, max_model_len=128)
    greedy(engine)
    trainer = trainer_state(seed=10)
    engine.load_weights(trainer.state_dict().items())
    hits = engine.core.block_manager.num_hit_blocks
    after = greedy(engine)
    assert engine.core.block_manager.num_hit_blocks == hits
    trainer.save_pretrained(tmp_path / "t")
    assert after == greedy(engine_for(tmp_path / "t"))


def test_missing_directory_and_config_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        engine_for(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="has no config.json"):
        engine_for(tmp_path)


@pytest.mark.parametrize("variant", ["qwen3", "qwen3-moe"])
def test_dummy_weights_from_a_config_alone(checkpoint_dir, tmp_path, variant):
    """load_format='dummy' on a directory with only config.json: random weights with the benchmarks' distribution
    (std 0.02, norms near 1), the same for the same seed; a checkpoint-format update over them serves exactly what
    an engine loaded from that checkpoint serves."""
    source = checkpoint_dir(variant)
    path = tmp_path / "config-only"
    path.mkdir()
    shutil.copy(source / "config.json", path)
    engine = RolloutEngine(model=str(path), device="cpu", num_kv_blocks=64, block_size=8, load_format="dummy")
    params = dict(engine.worker.model.named_parameters())
    norm = params["model.norm.weight"].float()
    assert abs(norm.mean().item() - 1.0) < 0.01 and 0.01 < norm.std().item() < 0.03
    embed = params["model.embed_tokens.weight"].float()
    assert abs(embed.mean().item()) < 0.002 and abs(embed.std().item() - 0.02) < 0.002
    again = RolloutEngine(model=str(path), device="cpu", num_kv_blocks=64, block_size=8, load_format="dummy")
    assert greedy(engine) == greedy(again)
    engine.load_weights(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict().items())
    assert greedy(engine) == greedy(engine_for(source))
