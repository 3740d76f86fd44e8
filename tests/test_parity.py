"""Greedy generation and raw logprobs match transformers exactly (fp32, CPU)."""

import pytest
import torch

from checkpoints import VARIANTS, load_reference
from rollout import RolloutEngine, SamplingParams

NEW_TOKENS = 40
PROMPTS = [[5, 17, 99, 250], list(range(30, 75)), [3], [200 + (7 * i) % 150 for i in range(21)]]


def reference_greedy(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    """Greedy continuation by the transformers forward (whole sequence each step, EOS not special),
    with the log-softmax of its logits at each chosen token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    tokens = ids[len(prompt):]
    return tokens, [logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_matches_transformers(checkpoint_dir, variant):
    path = checkpoint_dir(variant)
    engine = RolloutEngine(model=str(path), device="cpu", num_kv_blocks=64, block_size=8)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=True, logprobs_mode="raw")
    outs = engine.generate(PROMPTS, params, use_tqdm=False)
    reference = load_reference(path)
    for prompt, out in zip(PROMPTS, outs):
        tokens, logprobs = reference_greedy(reference, prompt)
        sample = out.samples[0]
        assert out.prompt_token_ids == prompt
        assert sample.token_ids == tokens
        assert max(abs(a - b) for a, b in zip(sample.logprobs, logprobs)) < 1e-4
        assert sample.finish_reason == "length" and sample.weight_version == 0


def test_kernel_format_fuses_projections(checkpoint_dir):
    """The engine's model is fused (qkv_proj, gate_up_proj) and holds the checkpoint's q/k/v rows in order."""
    path = checkpoint_dir("qwen2")
    engine = RolloutEngine(model=str(path), device="cpu", num_kv_blocks=32)
    params = dict(engine.worker.model.named_parameters())
    reference = dict(load_reference(path).named_parameters())
    attn = "model.layers.1.self_attn"
    fused = torch.cat([reference[f"{attn}.{p}_proj.bias"] for p in "qkv"])
    assert torch.equal(params[f"{attn}.qkv_proj.bias"], fused)
    mlp = "model.layers.0.mlp"
    fused = torch.cat([reference[f"{mlp}.gate_proj.weight"], reference[f"{mlp}.up_proj.weight"]])
    assert torch.equal(params[f"{mlp}.gate_up_proj.weight"], fused)
    assert not any("q_proj" in name for name in params)
