"""Every sampling setting runs in decode rounds (and, on CUDA, in the decode graphs) with the outputs of single
eager steps; penalties through the engine equal vLLM's definitions computed in float64 on transformers' logits."""

import pytest
import torch
from pydantic import ValidationError

from checkpoints import load_reference
from rollout import RolloutEngine, SamplingParams

PROMPTS = [list(range(10, 10 + n)) for n in (5, 40, 17, 3)]
COMMON = dict(max_tokens=21, ignore_eos=True, logprobs=True)
SETTINGS = [
    dict(temperature=0.9, top_k=7, seed=1),
    dict(temperature=1.2, top_p=0.8, min_p=0.05, seed=2, top_logprobs=3),
    dict(temperature=0.7, min_p=0.1, seed=3, logprobs_mode="raw", top_logprobs=2),
    dict(temperature=1.0, top_k=20, top_p=0.9, min_tokens=9, stop_token_ids=[12, 40, 77, 150], seed=4),
    dict(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3, seed=5),
    dict(temperature=0, repetition_penalty=0.8, frequency_penalty=-0.5, top_logprobs=4),
    dict(temperature=0.8, n=2, top_k=50, presence_penalty=-1.0, seed=6, top_logprobs=1),
]


def run(path, prompts, params, **config):
    """Outputs of a fresh engine; checks that rounds ran when asked for and that a small cache preempted."""
    fields = dict(device="cpu", block_size=8, num_kv_blocks=128, max_model_len=96) | config
    engine = RolloutEngine(model=str(path), **fields)
    rounds, launch = [], engine.worker.launch
    engine.worker.launch = lambda batch: rounds.append(batch.num_steps) or launch(batch)
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert max(rounds) == fields.get("num_decode_steps", 8)
    assert (engine.core.scheduler.num_preemptions > 0) == (fields["num_kv_blocks"] < 20)
    return outs


def summary(outs):
    return [[(s.token_ids, s.finish_reason, s.stop_reason, [sorted(t) for t in s.top_logprobs or []]) for s in o.samples]
            for o in outs]


@pytest.fixture(scope="module")
def path(checkpoint_dir):
    return checkpoint_dir("qwen3", seed=3)


@pytest.mark.parametrize("config", [dict(), dict(num_kv_blocks=14, enable_prefix_caching=False)],
                         ids=["roomy", "preempting"])
def test_rounds_give_the_single_step_outputs_for_every_setting(path, config):
    """Filters, min_tokens bans (a round starts before and ends after min_tokens), top logprobs, penalties:
    rounds of 4 steps, queued or not, give the tokens, logprobs and top logprobs of single steps."""
    params = [SamplingParams(**COMMON, **SETTINGS[i % len(SETTINGS)]) for i in range(len(SETTINGS))]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    baseline = run(path, prompts, params, num_decode_steps=1, **config)
    outs = run(path, prompts, params, num_decode_steps=4, **config)
    assert summary(outs) == summary(baseline)
    for out, ref in zip(outs, baseline):
        for s, r in zip(out.samples, ref.samples):
            assert s.logprobs == pytest.approx(r.logprobs, abs=1e-5)
            assert [sorted(t.values()) for t in s.top_logprobs or []] == \
                [pytest.approx(sorted(t.values()), abs=1e-5) for t in r.top_logprobs or []]
    banned = outs[3].samples[0]
    assert not {12, 40, 77, 150} & set(banned.token_ids[:8])


def penalized(logits, prompt, output, p):
    """vLLM's repetition, presence and frequency penalties in float64, token by token from the definitions."""
    x = logits.double().clone()
    for tok in set(prompt) | set(output):
        x[tok] = x[tok] / p.repetition_penalty if x[tok] > 0 else x[tok] * p.repetition_penalty
    for tok in set(output):
        x[tok] -= p.frequency_penalty * output.count(tok) + p.presence_penalty
    return x


@pytest.mark.parametrize("config", [dict(num_decode_steps=1), dict(num_decode_steps=4),
                                    dict(num_kv_blocks=14, enable_prefix_caching=False, num_decode_steps=4)],
                         ids=["steps", "rounds", "preempting"])
def test_penalties_follow_vllms_definition_on_transformers_logits(path, config):
    """Each sampled token's processed logprob is log_softmax(penalized / T) of the reference logits, with the
    penalties counting the prompt and the output before it; greedy rows pick the penalized argmax."""
    params = [SamplingParams(**COMMON, temperature=0, repetition_penalty=1.5, frequency_penalty=0.6),
              SamplingParams(**COMMON, temperature=0.8, repetition_penalty=0.7, presence_penalty=1.5,
                             frequency_penalty=-0.3, seed=7),
              SamplingParams(**COMMON, temperature=1.0, presence_penalty=-2.0, frequency_penalty=1.5, seed=8)]
    outs = run(path, PROMPTS[:3], params, **config)
    reference = load_reference(path)
    for prompt, p, out in zip(PROMPTS, params, outs):
        sample = out.samples[0]
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + sample.token_ids])).logits[0].double()
        shifts = []
        for i, tok in enumerate(sample.token_ids):
            row = logits[len(prompt) - 1 + i]
            x = penalized(row, prompt, sample.token_ids[:i], p)
            expected = torch.log_softmax(x / (p.temperature or 1.0), dim=-1)
            assert sample.logprobs[i] == pytest.approx(expected[tok].item(), abs=1e-4)
            if p.temperature == 0:
                assert tok == int(x.argmax())
            shifts.append(abs(expected[tok] - torch.log_softmax(row / (p.temperature or 1.0), dim=-1)[tok]))
        assert max(shifts) > 0.05  # the penalties matter


@pytest.mark.parametrize("field, value, words", [
    ("repetition_penalty", 0.0, "greater than 0"), ("repetition_penalty", -1.0, "greater than 0"),
    ("repetition_penalty", float("inf"), "finite"), ("presence_penalty", 2.5, "less than or equal to 2"),
    ("presence_penalty", -2.01, "greater than or equal to -2"), ("frequency_penalty", 3, "less than or equal to 2"),
    ("frequency_penalty", "1", "expected a number"), ("presence_penalty", True, "expected a number"),
])
def test_bad_penalties_raise_clear_errors(field, value, words):
    with pytest.raises(ValidationError, match=field) as info:
        SamplingParams(**{field: value})
    assert words in str(info.value)
