"""The engine on a CUDA device (what 'auto' picks: Triton kernels, CUDA graphs): run with `pytest -m gpu`."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from checkpoints import PROMPTS_06B, load_reference, save_qwen3_06b_shaped
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


def _teacher_forced(model, prompts, outs):
    """Per sampled token: (the model's logprob of it, whether the model's argmax is our top-1 token)."""
    rows = []
    for prompt, out in zip(prompts, outs):
        sample = out.samples[0]
        with torch.no_grad():
            ids = torch.tensor([prompt + sample.token_ids], device="cuda")
            ref = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
        rows += [(ref[i, t].item(), int(ref[i].argmax()), next(iter(top)))
                 for i, (t, top) in enumerate(zip(sample.token_ids, sample.top_logprobs))]
    return rows


BF16_PARAMS = SamplingParams(temperature=1.0, max_tokens=64, ignore_eos=True, logprobs=True, logprobs_mode="raw",
                             top_logprobs=1, seed=3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_close_to_transformers_on_a_qwen3_06b_checkpoint(tmp_path, dtype):
    """Qwen3-0.6B's shapes (4 of its layers) with transformers' own random init, the same half precision on both
    sides: logprobs of our samples within 2e-2 on average, argmax agreeing on >= 95% of the first 64 tokens."""
    save_qwen3_06b_shaped(tmp_path)
    prompts = PROMPTS_06B
    engine = RolloutEngine(model=str(tmp_path), device="cuda", dtype=dtype, num_kv_blocks=256, max_model_len=1024)
    outs = engine.generate(prompts, BF16_PARAMS, use_tqdm=False)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=getattr(torch, dtype)).cuda().eval()
    rows = _teacher_forced(reference, prompts, outs)
    ours = [lp for o in outs for lp in o.samples[0].logprobs]
    mean_diff = sum(abs(r[0] - lp) for r, lp in zip(rows, ours)) / len(rows)
    agree = sum(r[1] == r[2] for r in rows) / len(rows)
    print(f"{dtype}: mean |logprob difference| {mean_diff:.4f}, argmax agreement {agree:.3f} over {len(rows)} tokens")
    assert mean_diff <= 2e-2
    assert agree >= 0.95


def test_bf16_on_cuda_as_close_to_fp32_as_transformers_bf16(checkpoint_dir):
    """On the tiny test model (large random weights: rounding differences grow layer by layer), our bf16
    engine is no further from the fp32 forward than transformers' own bf16 forward is."""
    path = checkpoint_dir("qwen3")
    engine = RolloutEngine(model=str(path), device="cuda", dtype="bfloat16", num_kv_blocks=128)
    outs = engine.generate(PROMPTS, BF16_PARAMS, use_tqdm=False)
    exact = _teacher_forced(load_reference(path).to("cuda"), PROMPTS, outs)
    hf_bf16 = _teacher_forced(load_reference(path).to("cuda", torch.bfloat16), PROMPTS, outs)
    ours = [lp for o in outs for lp in o.samples[0].logprobs]
    our_error = sum(abs(e[0] - lp) for e, lp in zip(exact, ours)) / len(ours)
    hf_error = sum(abs(e[0] - h[0]) for e, h in zip(exact, hf_bf16)) / len(ours)
    assert our_error <= 1.1 * hf_error
    assert sum(e[1] == e[2] for e in exact) >= sum(e[1] == h[1] for e, h in zip(exact, hf_bf16)) - 0.02 * len(ours)


def test_seeded_samples_same_on_cuda_whatever_the_batch(checkpoint_dir):
    engine = RolloutEngine(model=str(checkpoint_dir("qwen3")), device="cuda", dtype="float32", num_kv_blocks=128)
    params = SamplingParams(n=3, temperature=0.8, top_p=0.9, max_tokens=24, ignore_eos=True, seed=17)
    alone = engine.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    mixed = engine.generate(PROMPTS[::-1], params, use_tqdm=False)[-1]
    assert [s.token_ids for s in alone.samples] == [s.token_ids for s in mixed.samples]
