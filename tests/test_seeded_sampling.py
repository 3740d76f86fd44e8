"""Engine-level tests of seeded sampling, stop conditions and logprobs on a tiny random Qwen3.

The expected tokens and logprobs come from an independent reference: the transformers model
of the same checkpoint (full forward pass per step, no KV cache), the processed distribution
computed by hand in float64, and Gumbel-max with the random numbers `hashed_uniform(key, step)`
(a pure function of the sample's key and the token index; tested on its own in
test_sampler.py). The one input taken from the engine is the sample's key: how a request seed
becomes per-sample keys is EngineCore's internal business (keyed by seed, prompt and sample
index), so `sample_keys` asks `EngineCore.add_request` for it. A reference step whose two best Gumbel scores are
closer than GAP would be a coin flip between float32 and float64, so the reference asserts
that none is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from checkpoints import load_reference, save_checkpoint  # tests/ is on sys.path (conftest.py)

from rollout.core import EngineCore
from rollout.engine import RolloutEngine
from rollout.sampling_params import SamplingParams
from worker.sampler import hashed_uniform

VOCAB = 384
GAP = 1e-4  # smallest allowed margin between the two best reference scores (engine vs transformers ~1e-6)
LOGPROB_ATOL = 1e-4  # engine (paged kernels) vs transformers, float32

PROMPT = [5, 17, 42, 99, 3, 250, 8]
OTHER_PROMPTS = [[11, 12, 13], [300, 1, 77, 77, 77, 5, 9, 23, 19, 4, 200], [64], [150, 151, 152, 153, 154, 155]]


# --------------------------------------------------------------------------------------------
# Fixtures and the reference
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("seeded") / "qwen3", "qwen3")


@pytest.fixture(scope="module")
def ref(ckpt):
    return Reference(load_reference(ckpt), eos_ids={2})


def make_engine(path, **overrides) -> RolloutEngine:
    config = dict(model=str(path), device="cpu", num_kv_blocks=128, block_size=4, max_model_len=96)
    config.update(overrides)
    return RolloutEngine(**config)


def processed_probs(logits, temperature, top_k, top_p, min_p, banned=()):
    """temperature (0 -> 1) -> top-k -> top-p on the renormalised remainder -> min-p -> renormalise."""
    x = logits.double().clone()
    if banned:
        x[list(banned)] = float("-inf")
    x = x / (temperature if temperature > 0 else 1.0)
    keep = torch.isfinite(x)
    order = torch.argsort(x, descending=True)
    if 0 < top_k < len(x):
        keep[order[top_k:]] = False
    if top_p < 1.0:
        cum = torch.softmax(x.masked_fill(~keep, float("-inf")), -1)[order].cumsum(0)
        last = int((cum >= top_p).nonzero()[0])
        keep[order[last + 1:]] = False
    if min_p > 0:
        p = torch.softmax(x.masked_fill(~keep, float("-inf")), -1)
        keep &= p >= min_p * p.max()
    return torch.softmax(x.masked_fill(~keep, float("-inf")), -1)


def sample_keys(prompt, params: SamplingParams, seed: int) -> list[int]:
    """The per-sample random-number keys EngineCore derives for a request (see module docstring)."""
    stub = SimpleNamespace(_next_group=0, _next_seq_id=0, scheduler=SimpleNamespace(add=lambda seq: None))
    return [seq.seed for seq in EngineCore.add_request(stub, "probe", list(prompt), params, seed)]


@dataclass
class RefSample:
    token_ids: list = field(default_factory=list)
    processed: list = field(default_factory=list)  # per step: processed log-distribution [V]
    raw: list = field(default_factory=list)  # per step: log_softmax(logits) [V]
    finish_reason: str | None = None
    stop_reason: int | None = None


class Reference:
    def __init__(self, model, eos_ids):
        self.model = model
        self.eos_ids = set(eos_ids)

    @torch.no_grad()
    def next_logits(self, ids: list[int]) -> torch.Tensor:
        # The tiny random model makes denormal floats on some inputs, which slow CPU matmuls
        # ~100x; flushing them (for the reference only) changes nothing measurable.
        torch.set_flush_denormal(True)
        try:
            return self.model(torch.tensor([ids])).logits[0, -1].double()
        finally:
            torch.set_flush_denormal(False)

    def generate(self, prompt, p: SamplingParams, index: int = 0) -> RefSample:
        """Sample `index` of a request, by the engine's documented semantics, step by step."""
        key = sample_keys(prompt, p, p.seed)[index] if p.temperature > 0 else None
        out = RefSample()
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
        for step in range(p.max_tokens):
            logits = self.next_logits(list(prompt) + out.token_ids)
            banned = sorted(stops) if step < p.min_tokens else []
            probs = processed_probs(logits, p.temperature, p.top_k, p.top_p, p.min_p, banned)
            if p.temperature == 0:
                score = logits.masked_fill(probs == 0, float("-inf"))
            else:
                u = hashed_uniform(torch.tensor([key]), torch.tensor([step]), len(logits))[0].double()
                assert (u < 1).all(), "hashed_uniform returned 1.0 (see test_sampler.py's hash-edge tests)"
                score = probs.log() - torch.log(-torch.log(u))
            best = score.topk(2)
            assert best.values[0] - best.values[1] > GAP, f"reference step {step} too close to call"
            token = int(best.indices[0])
            out.token_ids.append(token)
            out.processed.append(probs.log())
            out.raw.append(torch.log_softmax(logits, -1))
            if step + 1 >= p.min_tokens:
                if token in p.stop_token_ids:
                    out.finish_reason, out.stop_reason = "stop", token
                    break
                if not p.ignore_eos and token in self.eos_ids:
                    out.finish_reason = "stop"
                    break
        else:
            out.finish_reason = "length"
        return out


def assert_matches_reference(sample, expected: RefSample, p: SamplingParams):
    assert sample.token_ids == expected.token_ids
    assert sample.finish_reason == expected.finish_reason
    assert sample.stop_reason == expected.stop_reason
    if p.logprobs:
        dists = expected.raw if p.logprobs_mode == "raw" else expected.processed
        want = torch.stack([d[t] for d, t in zip(dists, expected.token_ids)])
        torch.testing.assert_close(torch.tensor(sample.logprobs, dtype=torch.float64), want,
                                   atol=LOGPROB_ATOL, rtol=0)


# --------------------------------------------------------------------------------------------
# Seeded reproducibility
# --------------------------------------------------------------------------------------------

SEEDED = [
    pytest.param(dict(temperature=1.0), id="plain"),
    pytest.param(dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05), id="filtered"),
]


def _others(seed_offset: int) -> list[SamplingParams]:
    """Different settings for the companion prompts (greedy, filtered, unseeded, n > 1)."""
    return [
        SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
        SamplingParams(temperature=1.2, top_k=10, max_tokens=20, seed=77 + seed_offset, logprobs=True),
        SamplingParams(temperature=0.7, n=3, max_tokens=9, ignore_eos=True),
        SamplingParams(top_p=0.5, max_tokens=14, seed=5 + seed_offset, ignore_eos=True, top_logprobs=2),
    ]


@pytest.mark.parametrize("settings", SEEDED)
def test_same_seed_same_sample_across_engines_and_batches(ckpt, ref, settings):
    p = SamplingParams(seed=1234, max_tokens=16, logprobs=True, top_logprobs=3, ignore_eos=True, **settings)
    expected = ref.generate(PROMPT, p)

    first = make_engine(ckpt).generate([PROMPT], p, use_tqdm=False)[0].samples[0]
    second = make_engine(ckpt).generate([PROMPT], p, use_tqdm=False)[0].samples[0]
    assert_matches_reference(first, expected, p)
    # Two engines on the same batch are bit-identical.
    assert second.token_ids == first.token_ids
    assert second.logprobs == first.logprobs
    assert second.top_logprobs == first.top_logprobs

    layouts = [
        # (engine settings, position of PROMPT among the others)
        (dict(max_num_seqs=256), 0),
        (dict(max_num_seqs=2, max_num_batched_tokens=8), 2),  # chunked prefill, sequence cap
        (dict(max_num_seqs=1), 4),
        (dict(max_num_seqs=8, num_kv_blocks=16, max_model_len=64, enable_prefix_caching=False), 1),  # preemption
    ]
    preempted = False
    for i, (engine_settings, pos) in enumerate(layouts):
        engine = make_engine(ckpt, **engine_settings)
        others = OTHER_PROMPTS if i % 2 == 0 else OTHER_PROMPTS[::-1]
        prompts = others[:pos] + [PROMPT] + others[pos:]
        params = _others(i)
        params = params[:pos] + [p] + params[pos:]
        outs = engine.generate(prompts, params, use_tqdm=False)
        got = outs[pos].samples[0]
        preempted |= engine.core.scheduler.num_preemptions > 0
        assert got.token_ids == first.token_ids, engine_settings
        assert_matches_reference(got, expected, p)
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(first.logprobs), atol=1e-5, rtol=0)
        assert [sorted(d) for d in got.top_logprobs] == [sorted(d) for d in first.top_logprobs]
    assert preempted, "the small-cache layout no longer preempts; shrink num_kv_blocks"


def test_n_samples_differ_and_each_is_valid(ckpt, ref):
    p = SamplingParams(n=4, seed=4321, temperature=1.0, max_tokens=12, logprobs=True, ignore_eos=True)
    engine = make_engine(ckpt)
    samples = engine.generate([PROMPT], p, use_tqdm=False)[0].samples
    assert len(samples) == 4
    token_lists = [tuple(s.token_ids) for s in samples]
    assert len(set(token_lists)) == 4, "the n samples of one request are not distinct"
    assert len({t[:3] for t in token_lists}) >= 3  # they differ early, not only by a late coincidence
    # Each sample follows the reference under its own key, and the keys are distinct.
    keys = sample_keys(PROMPT, p, p.seed)
    assert len(set(keys)) == 4
    for j, s in enumerate(samples):
        assert len(s.token_ids) == 12 and s.finish_reason == "length"
        assert_matches_reference(s, ref.generate(PROMPT, p, index=j), p)
    # The same request in another engine, in a different batch, gives the same four samples.
    other = make_engine(ckpt, max_num_seqs=3, max_num_batched_tokens=16)
    outs = other.generate([OTHER_PROMPTS[1], PROMPT, OTHER_PROMPTS[0]],
                          [SamplingParams(n=2, max_tokens=7), p, SamplingParams(seed=9, max_tokens=20)],
                          use_tqdm=False)
    assert [tuple(s.token_ids) for s in outs[1].samples] == token_lists


def test_unseeded_requests_use_the_engine_seed(ckpt):
    p = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    a = make_engine(ckpt, seed=3).generate([PROMPT, PROMPT], p, use_tqdm=False)
    b = make_engine(ckpt, seed=3).generate([PROMPT, PROMPT], p, use_tqdm=False)
    assert [o.samples[0].token_ids for o in a] == [o.samples[0].token_ids for o in b]
    assert a[0].samples[0].token_ids != a[1].samples[0].token_ids  # each request draws its own seed


# --------------------------------------------------------------------------------------------
# max_tokens, stop_token_ids, min_tokens
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [1, 7])
def test_max_tokens_gives_length(ckpt, ref, max_tokens):
    p = SamplingParams(seed=11, max_tokens=max_tokens, logprobs=True, top_logprobs=2, ignore_eos=True)
    s = make_engine(ckpt).generate([PROMPT], p, use_tqdm=False)[0].samples[0]
    assert len(s.token_ids) == max_tokens
    assert s.finish_reason == "length" and s.stop_reason is None
    assert len(s.logprobs) == len(s.top_logprobs) == max_tokens
    assert_matches_reference(s, ref.generate(PROMPT, p), p)


def test_max_model_len_gives_length(ckpt, ref):
    prompt = list(range(30, 42))  # 12 tokens; room for 4 more under max_model_len=16
    p = SamplingParams(seed=12, max_tokens=10, logprobs=True, ignore_eos=True)
    s = make_engine(ckpt, max_model_len=16).generate([prompt], p, use_tqdm=False)[0].samples[0]
    assert len(s.token_ids) == 4 and s.finish_reason == "length" and s.stop_reason is None
    assert s.token_ids == ref.generate(prompt, p).token_ids[:4]


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_stop_token_id_ends_the_sample(ckpt, ref, temperature):
    base = SamplingParams(temperature=temperature, seed=21, max_tokens=16, logprobs=True, ignore_eos=True)
    free = ref.generate(PROMPT, base)
    # the first token that has not appeared before, at position >= 2
    k = next(i for i in range(2, len(free.token_ids)) if free.token_ids[i] not in free.token_ids[:i])
    stop_id = free.token_ids[k]
    p = base.model_copy(update=dict(stop_token_ids=[stop_id]))
    s = make_engine(ckpt).generate([PROMPT], p, use_tqdm=False)[0].samples[0]
    assert s.token_ids == free.token_ids[:k + 1]
    assert s.token_ids[-1] == stop_id and stop_id not in s.token_ids[:-1]
    assert s.finish_reason == "stop" and s.stop_reason == stop_id
    assert len(s.logprobs) == k + 1


def _check_stop_rules(s, p: SamplingParams, stops: set[int]):
    toks = s.token_ids
    assert not stops & set(toks[:p.min_tokens]), f"stop token within the first min_tokens: {toks}"
    assert len(s.logprobs) == len(toks)
    if s.finish_reason == "stop":
        assert toks[-1] in stops and not stops & set(toks[p.min_tokens:-1])
        assert len(toks) >= p.min_tokens + 1
    else:
        assert s.finish_reason == "length" and s.stop_reason is None
        assert len(toks) == p.max_tokens and not stops & set(toks[p.min_tokens:])


STOP_IDS = list(range(0, VOCAB, 4))  # a quarter of the vocabulary: stops are frequent


@pytest.mark.parametrize("min_tokens", [0, 4])
def test_min_tokens_with_frequent_stop_tokens(ckpt, ref, min_tokens):
    count = 16
    params = [SamplingParams(seed=200 + i, max_tokens=10, min_tokens=min_tokens, stop_token_ids=STOP_IDS,
                             logprobs=True) for i in range(count)]
    prompts = [PROMPT[: 2 + i % 5] + [i] for i in range(count)]
    outs = make_engine(ckpt, max_num_seqs=5).generate(prompts, params, use_tqdm=False)
    early = 0
    for prompt, p, o in zip(prompts, params, outs):
        s = o.samples[0]
        _check_stop_rules(s, p, set(STOP_IDS) | {2})
        assert_matches_reference(s, ref.generate(prompt, p), p)
        if s.finish_reason == "stop":
            assert s.stop_reason == (s.token_ids[-1] if s.token_ids[-1] in STOP_IDS else None)
        early += len(s.token_ids) <= 4
    if min_tokens == 0:
        assert early >= 4, "stop tokens are not frequent enough for min_tokens to matter"
    else:
        assert early == 0
        assert sum(o.samples[0].finish_reason == "stop" for o in outs) >= 4


EOS_IDS = list(range(2, VOCAB, 5))  # many end-of-sequence ids: eos is sampled often


@pytest.fixture(scope="module")
def eos_ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("eos") / "qwen3", "qwen3", eos_token_id=EOS_IDS)


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_and_eos(eos_ckpt, ignore_eos):
    engine = make_engine(eos_ckpt)
    assert engine.core.stops.eos_token_ids == set(EOS_IDS)
    eref = Reference(load_reference(eos_ckpt), eos_ids=EOS_IDS)
    count = 12
    params = [SamplingParams(seed=500 + i, max_tokens=10, min_tokens=3, ignore_eos=ignore_eos, logprobs=True)
              for i in range(count)]
    outs = engine.generate([PROMPT] * count, params, use_tqdm=False)
    stopped = 0
    for p, o in zip(params, outs):
        s = o.samples[0]
        assert_matches_reference(s, eref.generate(PROMPT, p), p)
        if ignore_eos:
            assert s.finish_reason == "length" and len(s.token_ids) == 10
        else:
            _check_stop_rules(s, p, set(EOS_IDS))
            if s.finish_reason == "stop":
                assert s.stop_reason is None
                stopped += 1
    if ignore_eos:
        assert sum(t in EOS_IDS for o in outs for t in o.samples[0].token_ids[3:]) >= 5  # eos did come up
    else:
        assert stopped >= 4


# --------------------------------------------------------------------------------------------
# logprobs and top_logprobs
# --------------------------------------------------------------------------------------------

LOGPROB_CASES = [
    pytest.param(dict(temperature=1.0), 5, id="plain-k5"),
    pytest.param(dict(temperature=0.9, top_k=30, min_p=0.02), 5, id="filtered-k5"),
    pytest.param(dict(temperature=0.9, top_k=30, logprobs_mode="raw"), 4, id="raw-k4"),
    pytest.param(dict(temperature=1.0, top_k=3), 5, id="topk3-k5"),
    pytest.param(dict(temperature=0.0), 1, id="greedy-k1"),
]


@pytest.mark.parametrize("settings,k", LOGPROB_CASES)
def test_logprobs_and_top_logprobs(ckpt, ref, settings, k):
    params = [SamplingParams(seed=700 + i, max_tokens=12, logprobs=True, top_logprobs=k, ignore_eos=True,
                             **settings) for i in range(4)]
    prompts = [PROMPT, OTHER_PROMPTS[0], OTHER_PROMPTS[1], PROMPT[:3]]
    outs = make_engine(ckpt).generate(prompts, params, use_tqdm=False)
    within = outside = 0
    for prompt, p, o in zip(prompts, params, outs):
        s = o.samples[0]
        expected = ref.generate(prompt, p)
        assert_matches_reference(s, expected, p)
        assert len(s.logprobs) == len(s.top_logprobs) == len(s.token_ids)
        dists = expected.raw if p.logprobs_mode == "raw" else expected.processed
        for pos, (tok, lp, top) in enumerate(zip(s.token_ids, s.logprobs, s.top_logprobs)):
            assert len(top) == k
            ref_vals, ref_ids = dists[pos].sort(descending=True)
            got_vals = sorted(top.values(), reverse=True)
            torch.testing.assert_close(torch.tensor(got_vals, dtype=torch.float64), ref_vals[:k],
                                       atol=LOGPROB_ATOL, rtol=0)
            for tid, v in top.items():  # every entry is the distribution's value at that id
                assert v == pytest.approx(dists[pos][tid].item(), abs=LOGPROB_ATOL) or v == dists[pos][tid] == float(
                    "-inf")
            finite = [int(i) for i, v in zip(ref_ids[:k], ref_vals[:k]) if torch.isfinite(v)]
            assert set(finite) <= set(top)
            if tok in top:
                assert top[tok] == lp
                within += 1
            else:
                assert lp <= min(top.values()) + LOGPROB_ATOL
                outside += 1
    assert within > 0
    if settings.get("temperature") == 1.0 and "top_k" not in settings:
        assert outside > 0  # with k=5 of 384 tokens, some samples fall outside the top 5
