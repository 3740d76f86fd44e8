"""The sampler against hand-computed distributions: greedy, filters, logprobs, bans, top logprobs."""

import math
from types import SimpleNamespace

import pytest
import torch

from worker.steps import SamplingInfo
from worker.model_runner import ModelRunner
from worker.sampler import hashed_uniform, sample

from sampling_reference import (
    NEG_INF, TooClose, V, _check_empirical, _draws, _sorted_descending, make_tensors, random_logits, reference_probs,
)


FILTERS = [
    pytest.param({}, id="plain"),
    pytest.param({"top_k": 5}, id="top_k"),
    pytest.param({"top_p": 0.8}, id="top_p"),
    pytest.param({"min_p": 0.1}, id="min_p"),
    pytest.param({"top_k": 20, "top_p": 0.8, "min_p": 0.2}, id="combined"),
]


@pytest.mark.parametrize("filters", FILTERS)
def test_greedy_returns_argmax_and_t1_filtered_logprobs(filters):
    rows = 8
    logits = random_logits(11, rows)
    assert (logits.topk(2).values.diff(dim=-1).abs() > 1e-4).all()
    t = make_tensors(rows, temperature=0.0, seeds=torch.arange(rows) * 7919 + 3, k=4, **filters)
    out = sample(logits, t)
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    for r in range(rows):
        ref, _ = reference_probs(logits[r], temperature=1.0, **filters)
        assert out.logprobs[r].item() == pytest.approx(math.log(ref[out.token_ids[r]]), abs=1e-5)
        torch.testing.assert_close(out.top_logprobs[r].double(), ref.log().sort(descending=True).values[:4],
                                   atol=1e-5, rtol=0)

    raw = sample(logits, make_tensors(rows, temperature=0.0, raw=True, k=4, **filters))
    ref_raw = torch.log_softmax(logits.double(), dim=-1)
    assert torch.equal(raw.token_ids, logits.argmax(dim=-1))
    torch.testing.assert_close(raw.logprobs.double(), ref_raw.gather(1, raw.token_ids[:, None]).squeeze(1),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(raw.top_logprobs.double(), ref_raw.sort(dim=-1, descending=True).values[:, :4],
                               atol=1e-5, rtol=0)


def test_greedy_ignores_seed_and_step():
    logits = random_logits(12, 1).expand(64, -1).contiguous()
    out = sample(logits, make_tensors(64, temperature=0.0, seeds=torch.arange(64) * 1000003,
                                      steps=torch.arange(64) * 17))
    assert (out.token_ids == logits[0].argmax()).all()


def test_greedy_skips_banned_argmax():
    logits = random_logits(13, 4)
    top2 = logits.topk(2, dim=-1).indices
    banned = [(r, int(top2[r, 0])) for r in range(4)]
    out = sample(logits, make_tensors(4, temperature=0.0, banned=banned))
    assert torch.equal(out.token_ids, top2[:, 1])


# --------------------------------------------------------------------------------------------
# Sampled distributions
# --------------------------------------------------------------------------------------------

N_DRAWS = 100_000
DIST_LOGITS_SEED = 7

DIST_CASES = [
    pytest.param(dict(temperature=0.7), id="temperature"),
    pytest.param(dict(top_k=5), id="top_k"),
    pytest.param(dict(top_p=0.8), id="top_p"),
    pytest.param(dict(min_p=0.1), id="min_p"),
    pytest.param(dict(temperature=0.8, top_k=20, top_p=0.7, min_p=0.3), id="combined"),
]


@pytest.mark.parametrize("settings", DIST_CASES)
def test_sampled_distribution_matches_reference(settings, request):
    logits = random_logits(DIST_LOGITS_SEED)[0]
    probs, supports = reference_probs(logits, **settings)
    # Each filter asked for must remove tokens, or the case would not test it.
    for stage, name in ((1, "top_k"), (2, "top_p"), (3, "min_p")):
        if name in settings:
            assert supports[stage] < supports[stage - 1], (name, supports)
    case = request.node.callspec.id
    seed_base = 1_000_003 * (1 + [p.id for p in DIST_CASES].index(case))
    out = _draws(logits, N_DRAWS, seed_base, **settings)
    _check_empirical(out.token_ids, probs)
    # The processed logprob of each sampled token is the log of its reference probability.
    expected = probs.log()[out.token_ids]
    assert (out.logprobs.double() - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("settings", DIST_CASES)
def test_raw_logprob_mode_is_log_softmax_of_logits(settings):
    logits = random_logits(DIST_LOGITS_SEED)[0]
    probs, _ = reference_probs(logits, **settings)
    out = _draws(logits, 2000, 5, raw=True, **settings)
    assert (probs[out.token_ids] > 0).all()
    expected = torch.log_softmax(logits.double(), dim=-1)[out.token_ids]
    assert (out.logprobs.double() - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("settings", DIST_CASES)
def test_tokens_equal_gumbel_max_of_reference(settings):
    """Token = argmax(log p_ref + Gumbel(u)), u = hashed_uniform(seed, step): exact, row by row."""
    n = 4000
    logits = random_logits(21, n)
    seeds = torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(3))
    steps = torch.arange(n) % 97
    out = sample(logits, make_tensors(n, seeds=seeds, steps=steps, **settings))
    u = hashed_uniform(seeds, steps, V).double()
    gumbel = -torch.log(-torch.log(u))
    checked = 0
    for r in range(n):
        try:
            probs, _ = reference_probs(logits[r], **settings)
        except TooClose:  # a filter boundary within float32 rounding: either answer is right
            continue
        score = probs.log() + gumbel[r]
        top2 = score.topk(2)
        if top2.values[0] - top2.values[1] < 1e-4:  # too close to call in float32
            continue
        checked += 1
        assert out.token_ids[r].item() == top2.indices[0].item(), f"row {r}"
    assert checked > 0.95 * n


def test_mixed_rows_in_one_call_follow_their_own_settings():
    """Rows with and without filters, greedy and sampled, raw and processed, share one call."""
    rows = [
        dict(temperature=0.0),
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=5),
        dict(temperature=1.3, top_p=0.8, raw=True),
        dict(temperature=0.9, min_p=0.1),
        dict(temperature=1.0, top_k=20, top_p=0.8, min_p=0.2),
    ]
    reps = 400
    n = len(rows) * reps
    logits = random_logits(31, len(rows)).repeat(reps, 1)
    setting = {key: [rows[i % len(rows)].get(key, default) for i in range(n)]
               for key, default in dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, raw=False).items()}
    out = sample(logits, make_tensors(n, seeds=torch.arange(n) + 99, steps=3, k=3, **setting))
    for i, cfg in enumerate(rows):
        cfg = dict(cfg)
        raw = cfg.pop("raw", False)
        probs, _ = reference_probs(logits[i], **cfg)
        toks = out.token_ids[i::len(rows)]
        assert (probs[toks] > 0).all(), cfg
        chosen = torch.log_softmax(logits[i].double(), -1) if raw else probs.log()
        torch.testing.assert_close(out.logprobs[i::len(rows)].double(), chosen[toks], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.top_logprobs[i::len(rows)].double(),
                                   chosen.sort(descending=True).values[:3].expand(reps, -1), atol=1e-5, rtol=0)
    assert (out.token_ids[0::len(rows)] == logits[0].argmax()).all()


def test_model_runner_sampling_tensors_follow_sampling_info():
    """SamplingInfo -> SamplingTensors (ModelRunner) -> sample(): disabled filters, raw mode, bans."""
    kinds = [
        dict(temperature=0.0, top_k=-1, top_p=1.0, min_p=0.0),
        dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, logprobs_mode="processed", top_logprobs=2),
        dict(temperature=0.7, top_k=5, top_p=1.0, min_p=0.0, logprobs_mode="raw"),
        dict(temperature=1.0, top_k=-1, top_p=0.8, min_p=0.1, top_logprobs=4, banned_token_ids=[0, 1, 2],
             min_tokens=3),
    ]
    reps = 500
    infos = [SamplingInfo(seed=31 * i + 7, step=i % 3, **kinds[i % len(kinds)]) for i in range(reps * len(kinds))]
    fake = SimpleNamespace(vocab_size=V, device=torch.device("cpu"))
    fake._tensor = lambda values, dtype=torch.int64: ModelRunner._tensor(fake, values, dtype)
    fake._top_k, fake._top_p = (lambda info: ModelRunner._top_k(fake, info)), ModelRunner._top_p
    tensors = ModelRunner._sampling_tensors(fake, infos)
    assert tensors.max_top_logprobs == 4 and tensors.needs_sort and tensors.needs_min_p
    logits = random_logits(41, len(kinds))
    out = sample(logits.repeat(reps, 1), tensors)
    for i, kind in enumerate(kinds):
        probs, _ = reference_probs(logits[i], kind["temperature"], max(kind["top_k"], 0), kind["top_p"],
                                   kind["min_p"], kind.get("banned_token_ids", ()))
        toks = out.token_ids[i::len(kinds)]
        chosen = torch.log_softmax(logits[i].double(), -1) if kind.get("logprobs_mode") == "raw" else probs.log()
        torch.testing.assert_close(out.logprobs[i::len(kinds)].double(), chosen[toks], atol=1e-5, rtol=0)
        if kind["temperature"] == 0:
            assert (toks == logits[i].argmax()).all()
        else:
            _check_empirical(toks, probs)


# --------------------------------------------------------------------------------------------
# Banned tokens and top logprobs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.5), dict(top_k=5, top_p=0.9)], ids=str)
def test_banned_pairs_are_never_sampled(settings):
    n, k, groups = 40_000, 6, 4
    logits = random_logits(51, 1, scale=2.0)[0]
    order = logits.argsort(descending=True)
    # Row r (group g = r % 4) bans the g most likely tokens and the token ranked 5 + g; the
    # rows of a group share one processed distribution.
    group_bans = [[int(order[j]) for j in range(g)] + [int(order[5 + g])] for g in range(groups)]
    banned = [(r, c) for r in range(n) for c in group_bans[r % groups]]
    out = sample(logits.expand(n, -1).contiguous(),
                 make_tensors(n, seeds=torch.arange(n) + 12345, steps=torch.arange(n) % 5, k=k,
                              banned=banned, **settings))
    banned_mask = torch.zeros(n, V, dtype=torch.bool)
    banned_mask[[r for r, _ in banned], [c for _, c in banned]] = True
    hits = banned_mask.gather(1, out.token_ids[:, None]).squeeze(1)
    assert not hits.any(), f"banned tokens sampled at rows {hits.nonzero().flatten()[:10].tolist()}"
    for g in range(groups):
        rows = torch.arange(g, n, groups)
        ref, _ = reference_probs(logits, banned=group_bans[g], **settings)
        _check_empirical(out.token_ids[rows], ref)
        torch.testing.assert_close(out.logprobs[rows].double(), ref.log()[out.token_ids[rows]], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.top_logprobs[rows].double(),
                                   ref.log().sort(descending=True).values[:k].expand(len(rows), -1),
                                   atol=1e-5, rtol=0)
    # top logprobs: sorted, length k, a banned token only ever listed with -inf.
    assert out.top_ids.shape == (n, k) and out.top_logprobs.shape == (n, k)
    assert _sorted_descending(out.top_logprobs)
    top_banned = banned_mask.gather(1, out.top_ids)
    assert (out.top_logprobs[top_banned] == NEG_INF).all()


@pytest.mark.parametrize("raw", [False, True], ids=["processed", "raw"])
@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.6, top_k=3), dict(top_p=0.65, min_p=0.1)],
                         ids=str)
def test_top_logprobs_sorted_and_consistent(settings, raw):
    rows, k = 64, 8
    logits = random_logits(61, rows)
    banned = [(r, int(logits[r].argsort()[-2])) for r in range(0, rows, 3)]  # some rows ban their runner-up
    out = sample(logits, make_tensors(rows, seeds=torch.arange(rows) * 3 + 1, k=k, raw=raw, banned=banned,
                                      **settings))
    assert out.top_ids.shape == (rows, k) and out.top_logprobs.shape == (rows, k)
    assert _sorted_descending(out.top_logprobs), "top logprobs not sorted"
    for r in range(rows):
        bans = [c for rr, c in banned if rr == r]
        probs, _ = reference_probs(logits[r], banned=bans, **settings)
        chosen = torch.log_softmax(logits[r].double(), -1) if raw else probs.log()
        ref_vals, ref_ids = chosen.sort(descending=True)
        finite = torch.isfinite(ref_vals[:k])
        torch.testing.assert_close(out.top_logprobs[r].double(), ref_vals[:k], atol=1e-5, rtol=0)
        assert out.top_ids[r][finite].tolist() == ref_ids[:k][finite].tolist()
        assert len(set(out.top_ids[r].tolist())) == k
        # each listed value is the chosen distribution's value at the listed id
        torch.testing.assert_close(out.top_logprobs[r].double(), chosen[out.top_ids[r]], atol=1e-5, rtol=0)
        # the sampled token's logprob is listed whenever it ranks within the top k
        tok = out.token_ids[r].item()
        if tok in out.top_ids[r].tolist():
            j = out.top_ids[r].tolist().index(tok)
            assert out.top_logprobs[r, j].item() == out.logprobs[r].item()
        else:
            assert out.logprobs[r].item() <= out.top_logprobs[r, -1].item()


def test_zero_top_logprobs_gives_empty_tensors():
    out = sample(random_logits(71, 3), make_tensors(3, k=0))
    assert out.top_ids.shape == (3, 0) and out.top_logprobs.shape == (3, 0)
