"""Weight sync of a MoE model from a trainer process over gloo: both expert layouts, kernel format, validation."""

import torch
from safetensors.torch import load_file

from sync_helpers import connect, engine_for, greedy, kernel_tensors, sync
from trainer_process import TrainerError
from rollout import WeightUpdateRejected


def same_weights(engine, expected):
    return all(torch.equal(t, expected[name]) for name, t in kernel_tensors(engine).items())


def test_checkpoint_updates_equal_a_fresh_engine_and_repeat_harmlessly(trainer, checkpoint_dir):
    """The trainer's transformers model (stacked experts), then the per-expert tensors of its checkpoint, then the
    same again: every update gives exactly the weights of a fresh engine on the trainer's checkpoint."""
    old, new = checkpoint_dir("qwen3-moe", 0), checkpoint_dir("qwen3-moe", 1)
    fresh = engine_for(new)
    expected = kernel_tensors(fresh)
    engine = engine_for(old)
    connect(trainer, engine)
    per_expert = {"tensors": load_file(new / "model.safetensors")}
    for version, weights in enumerate([{"checkpoint": str(new)}, per_expert, per_expert, {"checkpoint": str(new)}], 1):
        sent, received = sync(trainer, engine, weights, version=version, bucket_bytes=16384)
        assert (sent, received) == (version, version)
        assert same_weights(engine, expected)
    assert greedy(engine) == greedy(fresh)


def test_kernel_format_update_of_whole_stacked_experts(trainer, checkpoint_dir):
    old, new = checkpoint_dir("qwen2-moe", 0), checkpoint_dir("qwen2-moe", 1)
    expected = kernel_tensors(engine_for(new))
    experts = {name: t for name, t in expected.items() if ".experts." in name}
    engine = engine_for(old)
    connect(trainer, engine)
    sync(trainer, engine, {"tensors": experts}, version=1, format="kernel", partial=True, bucket_bytes=16384)
    after = kernel_tensors(engine)
    before = kernel_tensors(engine_for(old))
    assert all(torch.equal(after[n], experts[n] if n in experts else before[n]) for n in after)
    sync(trainer, engine, {"tensors": expected}, version=2, format="kernel", bucket_bytes=16384)
    assert same_weights(engine, expected)


def test_bad_expert_updates_are_refused_before_any_byte_moves(trainer, checkpoint_dir):
    old, new = checkpoint_dir("qwen3-moe", 0), checkpoint_dir("qwen3-moe", 1)
    engine = engine_for(old)
    before = kernel_tensors(engine)
    connect(trainer, engine)
    tensors = load_file(new / "model.safetensors")
    missing = {n: t for n, t in tensors.items() if n != "model.layers.0.mlp.experts.3.gate_proj.weight"}
    cases = [
        ({"tensors": missing}, {}, "missing 1 tensor(s): model.layers.0.mlp.experts.3.gate_proj.weight"),
        ({"tensors": {"model.layers.2.mlp.experts.gate_up_proj": torch.randn(8, 64, 32)}}, dict(partial=True),
         "expected shape [8, 64, 64]"),
        ({"tensors": {"model.layers.2.mlp.experts.9.up_proj.weight": torch.randn(32, 64)}}, dict(partial=True),
         "unexpected"),
    ]
    for weights, options, reason in cases:
        sent, received = sync(trainer, engine, weights, version=1, **options)
        assert isinstance(received, WeightUpdateRejected) and reason in str(received)
        assert isinstance(sent, TrainerError) and reason in sent.message
    assert same_weights(engine, before)
