"""The counter-based noise: uniforms strictly inside (0, 1), keyed only by (seed, step, column)."""

import math

import pytest
import torch

from worker.sampler import hashed_uniform, sample, sample_seed

from sampling_reference import (
    EDGE_COL, EDGE_SEED, EDGE_STEP, V, _chi2_sf, make_tensors, random_logits, reference_probs,
)


def test_top_k_one_is_argmax_for_every_seed():
    """top_k=1 leaves one token, so every (seed, step) must give the argmax."""
    n = 50_000
    logits = random_logits(81, 1).expand(n, -1).contiguous()
    # Row 0 carries the seed of the hash edge case described below; the rest are arbitrary.
    seeds = torch.cat([torch.tensor([EDGE_SEED]), torch.arange(1, n, dtype=torch.int64) * 2654435761])
    out = sample(logits, make_tensors(n, top_k=1, seeds=seeds))
    wrong = (out.token_ids != logits[0].argmax()).nonzero().flatten()
    assert len(wrong) == 0, f"rows {wrong[:10].tolist()} sampled tokens {out.token_ids[wrong[:10]].tolist()}"


# The sampler once built its uniforms from 24 hash bits as (bits + 0.5) / 2**24 in float32. At
# bits = 2**24 - 1 the float32 sum rounded up to 2**24, so u == 1.0 exactly and the Gumbel noise
# -log(-log(u)) was +inf. About one (seed, step, column) in 2**24 did; with today's hash seed
# 551498, step 0 has its hash bits all ones at column 43 (found by a search over seeds). These
# tests pin the consequences.


def test_uniform_is_strictly_below_one_at_hash_edge():
    u = hashed_uniform(torch.tensor([EDGE_SEED]), torch.tensor([EDGE_STEP]), V)[0, EDGE_COL].item()
    assert u == 1 - 2**-24, f"({EDGE_SEED}, {EDGE_STEP}, {EDGE_COL}) is no longer the hash edge: u = {u!r}"


def test_banned_token_not_sampled_at_hash_edge():
    logits = random_logits(91, 1)
    out = sample(logits, make_tensors(1, seeds=[EDGE_SEED], steps=EDGE_STEP, banned=[(0, EDGE_COL)]))
    assert out.token_ids.item() != EDGE_COL
    assert torch.isfinite(out.logprobs).all()


def test_filtered_token_not_sampled_at_hash_edge():
    logits = random_logits(91, 1)
    logits[0, EDGE_COL] = logits.min() - 5.0  # least likely: outside top-k=5
    out = sample(logits, make_tensors(1, top_k=5, seeds=[EDGE_SEED], steps=EDGE_STEP))
    probs, _ = reference_probs(logits[0], top_k=5)
    assert probs[out.token_ids.item()] > 0, f"sampled {out.token_ids.item()} outside the top-5"


def test_negligible_token_not_forced_at_hash_edge():
    """A token of probability ~1e-13 must not be drawn (a correct sampler picks it w.p. 1e-13)."""
    logits = random_logits(91, 1)
    logits[0, EDGE_COL] = logits.max() - 30.0
    out = sample(logits, make_tensors(1, seeds=[EDGE_SEED], steps=EDGE_STEP))
    assert out.token_ids.item() != EDGE_COL


# --------------------------------------------------------------------------------------------
# hashed_uniform
# --------------------------------------------------------------------------------------------


def _uniform_grid(n_seeds=512, n_steps=8, vocab=512):
    seeds = (torch.arange(n_seeds, dtype=torch.int64) * 0x5851F42D4C957F2D & ((1 << 63) - 1)).repeat_interleave(
        n_steps)
    steps = torch.arange(n_steps, dtype=torch.int64).repeat(n_seeds)
    return seeds, steps, hashed_uniform(seeds, steps, vocab)


def test_hashed_uniform_range_mean_and_histogram():
    _, _, u = _uniform_grid()
    assert u.dtype == torch.float32 and u.shape == (512 * 8, 512)
    assert (u > 0).all() and (u < 1).all()
    n = u.numel()
    mean = u.double().mean().item()
    assert abs(mean - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.double().var().item() - 1 / 12) < 0.002
    counts = torch.histc(u, bins=32, min=0.0, max=1.0).double()
    stat = float(((counts - n / 32) ** 2 / (n / 32)).sum())
    assert _chi2_sf(stat, 31) > 1e-6
    # neighbouring columns, steps and seeds are uncorrelated
    c = u.double() - 0.5
    for a, b in ((c[:, :-1], c[:, 1:]), (c[:-1], c[1:]), (c[:-8], c[8:])):
        corr = (a * b).mean().item() / (1 / 12)
        assert abs(corr) < 5 / math.sqrt(a.numel())


def test_hashed_uniform_differs_across_seeds_and_steps():
    seeds, steps, u = _uniform_grid(n_seeds=32, n_steps=16, vocab=256)
    # no two (seed, step) rows share more than a couple of values by coincidence
    same = (u[:, None, :] == u[None, :, :]).sum(-1)
    same.fill_diagonal_(0)
    assert same.max().item() <= 2
    # high seed bits matter; swapping seed and step changes the stream
    base = torch.tensor([5, 5 + (1 << 32), 5 + (1 << 40), 5 + (1 << 62), 9], dtype=torch.int64)
    v = hashed_uniform(base, torch.tensor([9, 9, 9, 9, 5]), 256)
    for i in range(len(base)):
        for j in range(i + 1, len(base)):
            assert (v[i] != v[j]).float().mean() > 0.99, (i, j)


def _mix32(x: int) -> int:
    """The sampler's 32-bit mixer, written out from its definition."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x


def test_no_two_seeds_share_their_noise():
    """The hash keys a row on its whole 63-bit seed.

    It once folded the seed to 32 bits as low ^ mix(high) before mixing in the step, so the seeds
    (h << 32) | (L ^ mix(h)) all drew the same numbers at every step, for every h. They (and seeds at
    the ends of the range) must now draw unrelated ones.
    """
    low = 0x1234567
    folded = [(h << 32) | (low ^ _mix32(h)) for h in range(48)]
    seeds = torch.tensor(folded + [0, 1, 2**61 - 1, 2**62, 2**63 - 1, 2**63 - 2, 2**32, 2**32 - 1], dtype=torch.int64)
    for step in (0, 1, 1000):
        u = hashed_uniform(seeds, torch.full_like(seeds, step), 256)
        same = (u[:, None, :] == u[None, :, :]).sum(-1)
        same.fill_diagonal_(0)
        assert same.max().item() <= 2, f"step {step}: seeds {divmod(int(same.argmax()), len(seeds))} share noise"


def test_sample_seeds_are_distinct_for_distinct_request_seeds():
    """sample_seed(seed, prompt, index) is one-to-one in seed over [0, 2**63), for each prompt and index.

    Python's hash of an int is the int modulo 2**61 - 1, so seeds hashed with it collided:
    0, 2**61 - 1 and 2 * (2**61 - 1) once gave a request the same samples.
    """
    prompt = [5, 17, 42]
    seeds = [0, 1, 2**61 - 1, 2**61, 2 * (2**61 - 1), 2**62, 2**63 - 1, 2**63 - 2, 2**32, 12345]
    for index in (0, 1, 63):
        keys = [sample_seed(s, prompt, index) for s in seeds]
        assert len(set(keys)) == len(seeds), index
        assert all(0 <= k < 2**63 for k in keys)
    # the samples of one request differ, and so do two prompts sharing a seed
    assert len({sample_seed(7, prompt, j) for j in range(1000)}) == 1000
    assert sample_seed(7, prompt, 0) != sample_seed(7, [5, 17, 43], 0)
    assert sample_seed(7, prompt, 0) == sample_seed(7, tuple(prompt), 0)  # a pure function of the values


def test_hashed_uniform_is_a_function_of_seed_step_and_column_only():
    seeds = torch.tensor([3, 1 << 45, 77, 123456789012345, 3], dtype=torch.int64)
    steps = torch.tensor([0, 4, 9, 2, 7], dtype=torch.int64)
    alone = [hashed_uniform(seeds[i:i + 1], steps[i:i + 1], 300)[0] for i in range(len(seeds))]
    perm = torch.tensor([4, 2, 0, 3, 1])
    others = torch.tensor([11, 22], dtype=torch.int64)
    mixed = hashed_uniform(torch.cat([others, seeds[perm]]), torch.cat([others, steps[perm]]), 300)
    for pos, i in enumerate(perm.tolist()):
        assert torch.equal(mixed[2 + pos], alone[i])
    # a narrower vocabulary gives the same values for the columns it has
    narrow = hashed_uniform(seeds, steps, 50)
    assert torch.equal(narrow, torch.stack(alone)[:, :50])


def test_sampled_token_independent_of_batch_composition():
    """A row's token and logprob depend on its own logits, settings and (seed, step) only.

    Each row is checked against its own reference in the full call and again in smaller calls
    with other companions, where the batch-wide needs_sort / needs_min_p flags differ.
    """
    logits = random_logits(101, 6)
    settings = dict(temperature=[0.8, 1.0, 0.0, 1.2, 0.9, 1.0], top_k=[0, 5, 0, 0, 10, 0],
                    top_p=[1.0, 1.0, 0.9, 0.8, 1.0, 1.0], min_p=[0.0, 0.0, 0.0, 0.05, 0.1, 0.0])
    seeds, steps = torch.tensor([1, 2, 3, 4, 5, 1]), torch.tensor([0, 0, 0, 7, 7, 1])
    for rows in ([0, 1, 2, 3, 4, 5], [5, 0], [3, 5, 2], [4]):
        idx = torch.tensor(rows)
        sub = {key: [v[r] for r in rows] for key, v in settings.items()}
        out = sample(logits[idx], make_tensors(len(rows), seeds=seeds[idx], steps=steps[idx], k=3, **sub))
        for pos, r in enumerate(rows):
            probs, _ = reference_probs(logits[r], **{key: v[r] for key, v in settings.items()})
            if settings["temperature"][r] == 0:
                expected = logits[r].argmax()
            else:
                u = hashed_uniform(seeds[r:r + 1], steps[r:r + 1], V)[0].double()
                expected = (probs.log() - torch.log(-torch.log(u))).argmax()
            assert out.token_ids[pos] == expected, (rows, r)
            assert out.logprobs[pos].item() == pytest.approx(math.log(probs[expected]), abs=1e-5)
