"""Routing replay: a transformers MoE forward with the engine's recorded experts gives the engine's logprobs."""

import pytest
import torch
import torch.nn.functional as F

from checkpoints import load_reference
from rollout import RolloutEngine, SamplingParams
from trainer_adapters import moe_routers, replay_routing
from worker.models.moe import reference_experts

PROMPT = [5, 17, 99, 250, 31, 8]
NEW = 16


def sample_and_record(path):
    """A sampled completion with its logprobs, and the engine's routed experts for prompt + completion."""
    engine = RolloutEngine(model=str(path), device="cpu", num_kv_blocks=64, block_size=8, enable_prefix_caching=False)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=NEW, ignore_eos=True, logprobs=True,
                            logprobs_mode="raw")
    sample = engine.generate([PROMPT], params, use_tqdm=False)[0].samples[0]
    model = engine.worker.model
    tokens = PROMPT + sample.token_ids
    buffer = torch.zeros(len(tokens), len(model.moe_blocks()), model.moe_blocks()[0].top_k, dtype=torch.int16)
    model.record_routed_experts(buffer)
    engine.generate([tokens], SamplingParams(max_tokens=1), use_tqdm=False)  # one forward over every token
    model.record_routed_experts(None)
    return tokens, sample.logprobs, buffer


def completion_logprobs(model, tokens):
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[len(PROMPT) - 1 + i, t].item() for i, t in enumerate(tokens[len(PROMPT):])]


@pytest.mark.parametrize("variant", ["qwen3-moe", "qwen2-moe"])
def test_replayed_transformers_logprobs_equal_the_engines(checkpoint_dir, variant):
    path = checkpoint_dir(variant)
    tokens, logprobs, routes = sample_and_record(path)
    model = load_reference(path)
    with replay_routing(model, routes):
        replayed = completion_logprobs(model, tokens)
    assert replayed == pytest.approx(logprobs, abs=1e-4)
    with replay_routing(model, routes.unsqueeze(0)):  # [batch, seq, layers, top_k]
        assert completion_logprobs(model, tokens) == pytest.approx(replayed, abs=1e-6)


def test_replay_forces_the_given_experts_on_a_trainer_whose_router_moved(checkpoint_dir):
    """The trainer's routers drifted from the sampler's: under replay each MoE block computes exactly the given
    experts weighted by the trainer's own router probabilities (checked block by block against the float64
    reference experts)."""
    path = checkpoint_dir("qwen3-moe")
    tokens, _, routes = sample_and_record(path)
    model = load_reference(path)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for router in moe_routers(model):
            router.weight.add_(torch.randn(router.weight.shape, generator=gen))
    blocks = [m for m in model.modules() if type(m).__name__ == "Qwen3MoeSparseMoeBlock"]
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append((m, args[0][0], out[0]))) for b in blocks]
    with torch.no_grad():
        model(torch.tensor([tokens]), output_router_logits=True)
        own = [b.gate(x)[2] for b, x, _ in seen]
        assert any(not torch.equal(ids, routes[:, j].long()) for j, ids in enumerate(own))  # it would choose others
        seen.clear()
        with replay_routing(model, routes):
            model(torch.tensor([tokens]))
    for hook in hooks:
        hook.remove()
    for j, (block, x, out) in enumerate(seen):
        ids = routes[:, j].long()
        weights = torch.softmax(F.linear(x.double(), block.gate.weight.double()), -1).gather(1, ids)
        weights = weights / weights.sum(-1, keepdim=True)  # qwen3-moe renormalises
        experts = block.experts
        expected = reference_experts(x.double(), experts.gate_up_proj.double(), experts.down_proj.double(), weights,
                                     ids)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_replay_checks_the_routes(checkpoint_dir):
    model = load_reference(checkpoint_dir("qwen3-moe"))
    with pytest.raises(ValueError, match=r"must be \[tokens, 2, 2\]"):
        with replay_routing(model, torch.zeros(4, 3, 2, dtype=torch.int16)):
            pass
    with pytest.raises(ValueError, match="outside 0..7"):
        with replay_routing(model, torch.full((4, 2, 2), 8)):
            pass
    with pytest.raises(ValueError, match="covers 4 tokens, the forward has 5"):
        with replay_routing(model, torch.zeros(4, 2, 2, dtype=torch.int16)), torch.no_grad():
            model(torch.tensor([[1, 2, 3, 4, 5]]))
    assert all(not r._forward_hooks for r in moe_routers(model))
