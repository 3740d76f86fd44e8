"""The engine on a CUDA device (reference attention backend): run with `pytest -m gpu`."""

import pytest
import torch

from checkpoints import load_reference
from rollout import RolloutEngine, SamplingParams
from test_parity import PROMPTS, reference_greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("variant", ["qwen3", "llama3", "qwen2"])
def test_fp32_on_cuda_matches_transformers(checkpoint_dir, variant):
    path = checkpoint_dir(variant)
    engine = RolloutEngine(model=str(path), device="cuda", dtype="float32", num_kv_blocks=128, block_size=16)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=True, logprobs_mode="raw")
    outs = engine.generate(PROMPTS, params, use_tqdm=False)
    reference = load_reference(path)
    for prompt, out in zip(PROMPTS, outs):
        tokens, logprobs = reference_greedy(reference, prompt)
        assert out.samples[0].token_ids == tokens
        assert max(abs(a - b) for a, b in zip(out.samples[0].logprobs, logprobs)) < 1e-3


def test_bf16_on_cuda_close_to_transformers_bf16(checkpoint_dir):
    """Teacher-forced on our own samples: logprobs within 2e-2 on average, argmax agreeing at >= 95% of positions."""
    path = checkpoint_dir("qwen3")
    engine = RolloutEngine(model=str(path), device="cuda", dtype="bfloat16", num_kv_blocks=128)
    params = SamplingParams(temperature=1.0, max_tokens=64, ignore_eos=True, logprobs=True, logprobs_mode="raw",
                            top_logprobs=1, seed=3)
    outs = engine.generate(PROMPTS, params, use_tqdm=False)
    reference = load_reference(path).to("cuda", torch.bfloat16)
    diffs, agree = [], []
    for prompt, out in zip(PROMPTS, outs):
        sample = out.samples[0]
        with torch.no_grad():
            ids = torch.tensor([prompt + sample.token_ids], device="cuda")
            ref = torch.log_softmax(reference(ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
        diffs += [abs(ref[i, t].item() - lp) for i, (t, lp) in enumerate(zip(sample.token_ids, sample.logprobs))]
        agree += [next(iter(top)) == int(ref[i].argmax()) for i, top in enumerate(sample.top_logprobs)]
    assert sum(diffs) / len(diffs) <= 2e-2
    assert sum(agree) / len(agree) >= 0.95


def test_seeded_samples_same_on_cuda_whatever_the_batch(checkpoint_dir):
    engine = RolloutEngine(model=str(checkpoint_dir("qwen3")), device="cuda", dtype="float32", num_kv_blocks=128)
    params = SamplingParams(n=3, temperature=0.8, top_p=0.9, max_tokens=24, ignore_eos=True, seed=17)
    alone = engine.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    mixed = engine.generate(PROMPTS[::-1], params, use_tqdm=False)[-1]
    assert [s.token_ids for s in alone.samples] == [s.token_ids for s in mixed.samples]
