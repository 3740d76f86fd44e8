"""Mixture-of-experts models: both checkpoint layouts of the experts, routed-expert recording, load_weights."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import copy_checkpoint, edit_tensors, load_reference
from rollout import CheckpointError, RolloutEngine, SamplingParams
from sync_helpers import GREEDY, PROMPTS, kernel_tensors

MOE = ["qwen3-moe", "qwen2-moe"]


def engine_for(path, **config):
    return RolloutEngine(model=str(path), device="cpu", num_kv_blocks=64, block_size=8, **config)


def greedy_with_logprobs(engine):
    return [(o.samples[0].token_ids, o.samples[0].logprobs) for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]


def stacked_state(path) -> dict[str, torch.Tensor]:
    """transformers' own parameters of a checkpoint: experts stacked as mlp.experts.gate_up_proj / down_proj."""
    return {name: p.detach().clone() for name, p in load_reference(path).named_parameters()}


@pytest.mark.parametrize("variant", MOE)
def test_stacked_experts_checkpoint_loads_like_per_expert(checkpoint_dir, tmp_path, variant):
    """save_pretrained writes experts one by one; a checkpoint of transformers' stacked tensors loads the same."""
    path = checkpoint_dir(variant)
    per_expert = load_file(path / "model.safetensors")
    assert "model.layers.0.mlp.experts.7.up_proj.weight" in per_expert
    stacked = copy_checkpoint(path, tmp_path / "stacked")
    state = stacked_state(path)
    assert state["model.layers.0.mlp.experts.gate_up_proj"].dim() == 3
    save_file({n: t.contiguous() for n, t in state.items()}, stacked / "model.safetensors", metadata={"format": "pt"})
    engine = engine_for(path)
    params = dict(engine.worker.model.named_parameters())
    w13, w2 = params["model.layers.0.mlp.experts.w13"], params["model.layers.0.mlp.experts.w2"]
    for e in (0, 5):  # the kernel layout, built here from the per-expert file
        expert = f"model.layers.0.mlp.experts.{e}"
        gate_up = torch.cat([per_expert[f"{expert}.gate_proj.weight"], per_expert[f"{expert}.up_proj.weight"]])
        assert torch.equal(w13[e], gate_up) and torch.equal(w2[e], per_expert[f"{expert}.down_proj.weight"])
    other = kernel_tensors(engine_for(stacked))
    assert all(torch.equal(t, other[name]) for name, t in kernel_tensors(engine).items())


@pytest.mark.parametrize("variant", MOE)
def test_routed_experts_equal_transformers_router_choices(checkpoint_dir, variant):
    path = checkpoint_dir(variant)
    engine = engine_for(path, enable_prefix_caching=False)
    model = engine.worker.model
    blocks = model.moe_blocks()
    top_k = blocks[0].top_k
    buffer = torch.full((128, len(blocks), top_k), -1, dtype=torch.int16)
    model.record_routed_experts(buffer)
    reference = load_reference(path)
    for prompt in ([5, 17, 99, 250], list(range(30, 75))):
        engine.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)  # one forward: the prompt
        with torch.no_grad():
            logits = reference(torch.tensor([prompt]), output_router_logits=True).router_logits
        assert len(logits) == len(blocks)
        expected = torch.stack([torch.topk(torch.softmax(x.float(), -1), top_k, dim=-1).indices for x in logits], 1)
        assert torch.equal(buffer[: len(prompt)].long(), expected)
    model.record_routed_experts(None)
    assert all(block.record is None for block in blocks)
    with pytest.raises(ValueError, match="int16"):
        model.record_routed_experts(torch.zeros(4, len(blocks), top_k, dtype=torch.int32))


@pytest.mark.parametrize("variant", MOE)
def test_load_weights_takes_either_layout_and_is_idempotent(checkpoint_dir, variant):
    old, new = checkpoint_dir(variant, 0), checkpoint_dir(variant, 1)
    expected = kernel_tensors(engine_for(new))
    engine = engine_for(old)
    for _ in range(2):  # a second identical load changes nothing
        engine.load_weights(stacked_state(new))
        assert all(torch.equal(t, expected[name]) for name, t in kernel_tensors(engine).items())
    engine = engine_for(old)
    engine.load_weights(load_file(new / "model.safetensors"))  # per-expert names
    engine.load_weights(load_file(new / "model.safetensors"))
    assert all(torch.equal(t, expected[name]) for name, t in kernel_tensors(engine).items())


def test_bad_expert_tensors_are_refused(checkpoint_dir, tmp_path):
    path = checkpoint_dir("qwen3-moe")
    engine = engine_for(path)
    cases = [
        ({"model.layers.0.mlp.experts.8.up_proj.weight": torch.randn(32, 64)}, "unexpected"),  # 8 experts: 0..7
        ({"model.layers.0.mlp.experts.3.up_proj.weight": torch.randn(64, 32)}, "expected shape [32, 64]"),
        ({"model.layers.0.mlp.experts.gate_up_proj": torch.randn(8, 32, 64)}, "expected shape [8, 64, 64]"),
        ({"model.layers.1.mlp.experts.down_proj": torch.randn(8, 64, 32)}, "unexpected"),  # layer 1 is dense
    ]
    for weights, reason in cases:
        with pytest.raises(CheckpointError, match=reason.replace("[", r"\[")):
            engine.load_weights(weights)
    broken = edit_tensors(copy_checkpoint(path, tmp_path / "broken"),
                          lambda t: t.pop("model.layers.2.mlp.experts.5.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model.layers.2.mlp.experts.5.down_proj"):
        engine_for(broken)


def test_expert_parallel_size_must_divide_tensor_parallel_size(checkpoint_dir):
    with pytest.raises(ValueError, match="expert_parallel_size=2 must divide tensor_parallel_size=1"):
        engine_for(checkpoint_dir("qwen3-moe"), expert_parallel_size=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", MOE + ["qwen3-moe-tied", "qwen2-moe-tied"])
def test_fused_experts_on_cuda_match_transformers(checkpoint_dir, variant):
    """fp32 on CUDA: Triton fused experts, decode steps from CUDA graphs; greedy tokens and logprobs of the
    transformers forward."""
    from test_parity import PROMPTS as PARITY_PROMPTS, reference_greedy

    path = checkpoint_dir(variant)
    engine = RolloutEngine(model=str(path), device="cuda", dtype="float32", num_kv_blocks=128, block_size=16)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=True, logprobs_mode="raw")
    outs = engine.generate(PARITY_PROMPTS, params, use_tqdm=False)
    reference = load_reference(path)
    for prompt, out in zip(PARITY_PROMPTS, outs):
        tokens, logprobs = reference_greedy(reference, prompt)
        assert out.samples[0].token_ids == tokens
        assert max(abs(a - b) for a, b in zip(out.samples[0].logprobs, logprobs)) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_routed_experts_recorded_on_cuda(checkpoint_dir):
    """The prefill forward on CUDA (fused path) records transformers' router choices."""
    path = checkpoint_dir("qwen3-moe")
    engine = RolloutEngine(model=str(path), device="cuda", dtype="float32", num_kv_blocks=64,
                           enable_prefix_caching=False)
    model = engine.worker.model
    buffer = torch.full((64, 2, 2), -1, dtype=torch.int16, device="cuda")
    model.record_routed_experts(buffer)
    prompt = list(range(30, 75))
    engine.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)
    with torch.no_grad():
        logits = load_reference(path)(torch.tensor([prompt]), output_router_logits=True).router_logits
    expected = torch.stack([torch.topk(torch.softmax(x.float(), -1), 2, dim=-1).indices for x in logits], 1)
    assert torch.equal(buffer[: len(prompt)].cpu().long(), expected)
