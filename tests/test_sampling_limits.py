"""Sampling values at and past their limits: refused before any work starts, or computed without NaN.

The limits come from float32 and from the random-number hash: the samplers (torch, and Triton's
fused one) divide float32 logits by the temperature, so MIN_TEMPERATURE must keep logits up to
LOGIT_BOUND finite; seeds are the 63 bits the hash keys a sample on without collisions.
"""

import math
import re

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from rollout import EngineConfig, RolloutEngine, SamplingParams
from rollout.sampling_params import MAX_SEED, MAX_TEMPERATURE, MAX_TOP_K, MIN_TEMPERATURE
from worker.sampler import torch_sample

from sampling_reference import make_tensors, random_logits

LOGIT_BOUND = 3.4e8  # the largest |logit| MIN_TEMPERATURE is documented to handle
VOCAB, EOS = 384, 2  # the test checkpoints' (tests/checkpoints.py)


@pytest.mark.parametrize("fields, message", [
    (dict(temperature=1e-39), "must be 0 (greedy) or from 1e-30 to 1e+30, got 1e-39"),
    (dict(temperature=MIN_TEMPERATURE / 2), "must be 0 (greedy) or from 1e-30"),
    (dict(temperature=-1e-3), "must be 0 (greedy) or from 1e-30"),
    (dict(temperature=MAX_TEMPERATURE * 2), "must be 0 (greedy) or from 1e-30 to 1e+30"),
    (dict(temperature=float("inf")), "Input should be a finite number"),
    (dict(temperature=float("nan")), "Input should be a finite number"),
    (dict(temperature=np.float32("inf")), "Input should be a finite number"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(min_p=float("inf")), "min_p"),
    (dict(top_k=10**30), "Input should be less than or equal to 2147483647"),
    (dict(top_k=MAX_TOP_K + 1), "Input should be less than or equal to 2147483647"),
    (dict(seed=-1), "Input should be greater than or equal to 0"),
    (dict(seed=MAX_SEED + 1), "Input should be less than or equal to 9223372036854775807"),
    (dict(seed=10**30), "Input should be less than or equal to 9223372036854775807"),
])
def test_values_that_cannot_be_computed_are_refused(fields, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        SamplingParams(**fields)


def test_values_at_the_limits_are_accepted():
    for fields in (dict(temperature=0), dict(temperature=MIN_TEMPERATURE), dict(temperature=MAX_TEMPERATURE),
                   dict(top_k=MAX_TOP_K), dict(seed=0), dict(seed=MAX_SEED), dict(seed=np.int64(5), n=np.int32(2))):
        params = SamplingParams(**fields)
        assert all(getattr(params, name) == value and type(getattr(params, name)) in (int, float)
                   for name, value in fields.items())


def test_engine_seed_is_bounded_like_request_seeds():
    with pytest.raises(ValidationError, match="less than or equal to 9223372036854775807"):
        EngineConfig(model="unused", seed=MAX_SEED + 1)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        EngineConfig(model="unused", seed=-1)
    assert EngineConfig(model="unused", seed=MAX_SEED).seed == MAX_SEED


def _extreme_logits(rows: int, vocab: int) -> torch.Tensor:
    """Random logits whose largest magnitude is just under LOGIT_BOUND, row maxima included."""
    logits = random_logits(17, rows, vocab)
    return logits / logits.abs().amax(dim=-1, keepdim=True) * (0.99 * LOGIT_BOUND)


def test_torch_sampler_at_min_temperature_is_greedy_and_finite():
    rows = 6
    logits = _extreme_logits(rows, 50)
    out = torch_sample(logits, make_tensors(rows, temperature=MIN_TEMPERATURE, raw=[False, True] * 3, vocab=50,
                                            seeds=torch.arange(rows) * 7919 + (1 << 62)))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    # processed: all the mass on the greedy token; raw: the log-softmax of the logits
    assert out.logprobs[0::2].tolist() == [0.0] * 3
    expected_raw = torch.log_softmax(logits.double(), -1).gather(1, out.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs[1::2].double(), expected_raw[1::2], rtol=0, atol=1e-6)


def test_torch_sampler_at_max_temperature_is_uniform_and_keeps_bans():
    rows, vocab = 200, 50
    logits = random_logits(23, 1, vocab).expand(rows, -1).contiguous() * 30
    banned = [(r, c) for r in range(rows) for c in (3, 7, 11)]
    out = torch_sample(logits, make_tensors(rows, temperature=MAX_TEMPERATURE, banned=banned, vocab=vocab,
                                            seeds=torch.arange(rows) + (1 << 40)))
    assert not set(out.token_ids.tolist()) & {3, 7, 11}
    torch.testing.assert_close(out.logprobs, torch.full((rows,), -math.log(vocab - 3)), rtol=0, atol=1e-6)
    assert len(set(out.token_ids.tolist())) > 30  # uniform over 47 tokens: 200 draws hit most of them


# At MIN_TEMPERATURE the interpreter's numpy warns that (very negative logit - row max) / T overflows;
# that value is -inf, whose exponential is the 0 it stands for.
@pytest.mark.filterwarnings("ignore:overflow encountered in subtract:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered in divide:RuntimeWarning")
def test_triton_sampler_agrees_at_the_limits():
    """The fused sampler (Triton's interpreter on CPU) picks the torch sampler's tokens at the extreme
    temperatures and at seeds across the whole range, the ends included."""
    pytest.importorskip("triton")
    from worker.kernels.sampling import fused_sample

    device = "cuda" if torch.cuda.is_available() else "cpu"  # conftest picked the interpreter without CUDA
    rows, vocab = 8, 5003
    seeds = torch.tensor([0, 1, 2**61 - 1, 2**62, MAX_SEED, MAX_SEED - 1, 2**32, 2**32 - 1])
    for temperature, logits in ((MIN_TEMPERATURE, _extreme_logits(rows, vocab)),
                                (MAX_TEMPERATURE, random_logits(5, rows, vocab) * 30),
                                (1.0, random_logits(6, rows, vocab) * 3)):
        t = make_tensors(rows, temperature=temperature, seeds=seeds, steps=torch.arange(rows) * 5, vocab=vocab)
        logits = logits.to(device)
        t = type(t)(**{name: v.to(device) if torch.is_tensor(v) else v for name, v in vars(t).items()})
        expected = torch_sample(logits, t)
        tokens = torch.empty(rows, dtype=torch.int64, device=device)
        logprobs = torch.empty(rows, device=device)
        fused_sample(logits, t.temperature, t.seeds, t.steps, t.use_raw, tokens, logprobs)
        assert torch.equal(tokens, expected.token_ids), temperature
        assert torch.isfinite(logprobs).all()
        torch.testing.assert_close(logprobs, expected.logprobs, atol=1e-4, rtol=0)
        if temperature == MIN_TEMPERATURE:
            assert torch.equal(tokens, logits.argmax(dim=-1))
        if temperature == 1.0:
            assert len(set(tokens.tolist())) == rows  # the seeds really sample, each its own token


@pytest.fixture(scope="module")
def engine(checkpoint_dir):
    return RolloutEngine(model=str(checkpoint_dir("qwen3")), device="cpu", num_kv_blocks=64, max_model_len=64)


def test_engine_at_min_temperature_samples_the_greedy_tokens(engine):
    prompt = [[5, 17, 42, 99]]
    greedy = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    tiny = SamplingParams(temperature=MIN_TEMPERATURE, max_tokens=8, ignore_eos=True, logprobs=True, seed=3)
    [sample] = engine.generate(prompt, tiny, use_tqdm=False)[0].samples
    assert sample.token_ids == greedy[0].samples[0].token_ids
    assert sample.logprobs == [0.0] * 8  # all the mass on the greedy token


def test_engine_at_max_temperature_keeps_min_tokens_bans(engine):
    """Uniform sampling, with EOS banned for the first min_tokens: exact logprobs, never NaN."""
    params = SamplingParams(n=8, temperature=MAX_TEMPERATURE, min_tokens=3, max_tokens=5, logprobs=True, seed=11)
    samples = engine.generate([[5, 17, 42, 99]], params, use_tqdm=False)[0].samples
    for s in samples:
        assert EOS not in s.token_ids[:3]
        torch.testing.assert_close(torch.tensor(s.logprobs[:3]), torch.full((3,), -math.log(VOCAB - 1)),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(s.logprobs[3:]), torch.full((len(s.token_ids) - 3,),
                                   -math.log(VOCAB)), rtol=0, atol=1e-5)


def test_engine_top_k_at_its_limit_keeps_every_token(engine):
    """A top_k past the vocabulary filters nothing: the same samples as top_k=-1."""
    prompt = [[5, 17, 42, 99]]
    params = SamplingParams(n=3, max_tokens=8, ignore_eos=True, seed=5, logprobs=True)
    limit = engine.generate(prompt, params.model_copy(update={"top_k": MAX_TOP_K}), use_tqdm=False)[0].samples
    assert limit == engine.generate(prompt, params, use_tqdm=False)[0].samples


def test_seeds_python_hashes_alike_give_different_samples(engine):
    """hash(0) == hash(2**61 - 1) in Python; seeds must not be folded by it. MAX_SEED works too."""
    prompt = [[5, 17, 42, 99]]
    runs = [[s.token_ids for s in engine.generate(prompt, SamplingParams(n=4, max_tokens=16, ignore_eos=True,
                                                                          temperature=1.5, seed=seed),
                                                   use_tqdm=False)[0].samples]
            for seed in (0, 2**61 - 1, 2 * (2**61 - 1), MAX_SEED)]
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            assert all(a != b for a, b in zip(runs[i], runs[j])), (i, j)
