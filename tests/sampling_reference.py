"""Unit tests of `worker.sampler.sample` and `hashed_uniform` against hand-computed references.

Every expectation is computed here with plain float64 torch from the definitions
(temperature -> top-k -> top-p -> min-p -> renormalise, Gumbel-max sampling), never by
calling the sampler a second time. Statistical checks use fixed seeds, so they are
deterministic; their tolerances are chosen so that a correct sampler would fail them
with probability below 1e-6 (see `_check_empirical`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from worker.penalties import PenaltyTensors
from worker.sampler import SamplingTensors, sample

V = 50
NEG_INF = float("-inf")
# Guard bands: a filter decision of the reference must not sit this close to its threshold,
# so that float32 (sampler) and float64 (reference) cannot disagree about it.
MARGIN = 1e-4
# (seed, step, column) at which hashed_uniform's 24 hash bits are all ones; see the hash-edge tests.
EDGE_SEED, EDGE_STEP, EDGE_COL = 551498, 0, 43


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _per_row(value, n):
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def make_tensors(n, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None, steps=0, raw=False,
                 banned=(), k=0, vocab=V) -> SamplingTensors:
    """SamplingTensors for n rows, following ModelRunner's conventions.

    top_k <= 0 disables top-k (stored as the vocabulary size); top_p >= 1 disables top-p
    (stored as 2.0); `banned` is a list of (row, token) pairs; scalars apply to every row.
    """
    temperature, top_k, top_p, min_p, raw = (_per_row(v, n) for v in (temperature, top_k, top_p, min_p, raw))
    seeds = torch.arange(n, dtype=torch.int64) if seeds is None else torch.as_tensor(seeds, dtype=torch.int64)
    steps = torch.as_tensor(_per_row(steps, n) if not torch.is_tensor(steps) else steps, dtype=torch.int64)
    banned = list(banned)
    return SamplingTensors(
        temperature=torch.tensor(temperature, dtype=torch.float32),
        top_k=torch.tensor([kk if kk > 0 else vocab for kk in top_k], dtype=torch.int64),
        top_p=torch.tensor([p if p < 1.0 else 2.0 for p in top_p], dtype=torch.float32),
        min_p=torch.tensor(min_p, dtype=torch.float32),
        seeds=seeds,
        steps=steps,
        use_raw=torch.tensor(raw, dtype=torch.bool),
        banned_rows=torch.tensor([r for r, _ in banned], dtype=torch.int64),
        banned_cols=torch.tensor([c for _, c in banned], dtype=torch.int64),
        needs_sort=any(0 < kk < vocab or p < 1.0 for kk, p in zip(top_k, top_p)),
        needs_min_p=any(m > 0 for m in min_p),
        max_top_logprobs=k,
    )


def random_logits(seed: int, rows: int = 1, vocab: int = V, scale: float = 1.0) -> torch.Tensor:
    """Random non-zero float32 logits [rows, vocab]."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * scale
    assert (logits != 0).all()
    return logits


class TooClose(AssertionError):
    """A reference filter decision lies within MARGIN of its threshold."""


def _clear(condition, what):
    if not condition:
        raise TooClose(what)


def reference_probs(logits_row, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, banned=()):
    """The processed distribution, by hand in float64.

    temperature (0 counts as 1) -> top-k -> top-p (smallest set of most likely tokens whose
    renormalised mass reaches top_p) -> min-p (drop p < min_p * max p, on the distribution
    left by top-k/top-p) -> renormalise. Raises TooClose unless every decision is clear of its
    threshold by MARGIN (so float32 rounding in the sampler cannot flip it).
    Returns (probs, supports) where supports lists the support size after each stage.
    """
    x = logits_row.double().clone()
    for tok in banned:
        x[tok] = NEG_INF
    x = x / (temperature if temperature > 0 else 1.0)
    keep = torch.isfinite(x)
    supports = [int(keep.sum())]
    order = torch.argsort(x, descending=True)
    if 0 < top_k < len(x):
        sx = x[order]
        if torch.isfinite(sx[top_k]):
            _clear(sx[top_k - 1] - sx[top_k] > MARGIN, "top-k boundary too close to a tie")
        keep[order[top_k:]] = False
    supports.append(int(keep.sum()))
    if top_p < 1.0:
        p = torch.softmax(x.masked_fill(~keep, NEG_INF), dim=-1)[order]
        cum = p.cumsum(0)
        last = int((cum >= top_p).nonzero()[0])  # first rank at which the mass reaches top_p
        _clear(cum[last] - top_p > MARGIN, "top-p boundary too close")
        _clear(last == 0 or top_p - cum[last - 1] > MARGIN, "top-p boundary too close")
        keep[order[last + 1:]] = False
    supports.append(int(keep.sum()))
    if min_p > 0:
        p = torch.softmax(x.masked_fill(~keep, NEG_INF), dim=-1)
        threshold = min_p * p.max()
        _clear(((p - threshold).abs()[keep] > MARGIN * threshold).all(), "min-p boundary too close")
        keep &= p >= threshold
    supports.append(int(keep.sum()))
    probs = torch.softmax(x.masked_fill(~keep, NEG_INF), dim=-1)
    return probs, supports


def _sorted_descending(values: torch.Tensor) -> bool:
    return bool((values[:, :-1] >= values[:, 1:]).all())  # (-inf, -inf) counts as sorted


def _chi2_sf(stat: float, df: int) -> float:
    """Survival function of the chi-square distribution."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _check_empirical(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    """Draws `tokens` (N,) must follow `probs` (V,): none outside the support, chi-square, TV.

    * chi-square (bins with expected count < 5 pooled): p-value > 1e-6.
    * total variation: E[TV] <= 1/2 sum sqrt(p(1-p)/N) (Jensen), and TV is 1/N-Lipschitz in
      each draw, so McDiarmid gives P(TV > E[TV] + t) <= exp(-2 N t^2); t = sqrt(ln(1e6) / 2N)
      makes the bound fail a correct sampler with probability <= 1e-6 (about 0.02 at N=1e5).
    """
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    outside = counts[probs == 0].sum().item()
    assert outside == 0, f"{outside:.0f} draws outside the support {sorted((probs > 0).nonzero().flatten().tolist())}"
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big & (probs > 0)].sum()[None]])
    exp = torch.cat([expected[big], expected[~big & (probs > 0)].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    pval = _chi2_sf(stat, len(exp) - 1) if len(exp) > 1 else 1.0
    assert pval > 1e-6, f"chi-square {stat:.1f} on {len(exp) - 1} df, p={pval:.2e}"
    tv = 0.5 * (counts / n - probs).abs().sum().item()
    tol = 0.5 * torch.sqrt(probs * (1 - probs) / n).sum().item() + math.sqrt(math.log(1e6) / (2 * n))
    assert tv < tol, f"total variation {tv:.4f} >= {tol:.4f}"


def _draws(logits_row: torch.Tensor, n: int, seed_base: int, **settings):
    """n samples of one row: every row of one call has the same logits and its own (seed, step)."""
    seeds = seed_base + torch.arange(n, dtype=torch.int64) // 3
    steps = torch.arange(n, dtype=torch.int64) % 3
    return sample(logits_row.expand(n, -1).contiguous(), make_tensors(n, seeds=seeds, steps=steps, **settings))


# --------------------------------------------------------------------------------------------
# Greedy
# --------------------------------------------------------------------------------------------


def penalty_tensors(prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
                    repetition: Sequence[float], presence: Sequence[float], frequency: Sequence[float],
                    vocab_size: int, device: torch.device | str = "cpu") -> PenaltyTensors:
    """PenaltyTensors for rows given as host lists, built independently of the engine's device-side
    `fill_penalty_state` (the tests' reference state)."""
    rows = len(prompts)
    counts = torch.zeros(rows, vocab_size, dtype=torch.int32)
    mask = torch.zeros(rows, vocab_size, dtype=torch.bool)
    for row, (prompt, output) in enumerate(zip(prompts, outputs)):
        mask[row, list(prompt)] = True
        counts[row].index_add_(0, torch.as_tensor(list(output), dtype=torch.int64),
                               torch.ones(len(output), dtype=torch.int32))
    floats = [torch.tensor(list(v), dtype=torch.float32) for v in (repetition, presence, frequency)]
    return PenaltyTensors(*(v.to(device) for v in floats), counts.to(device), mask.to(device))
