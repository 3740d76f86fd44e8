"""Sampling on the device: penalties, temperature, top-k, top-p, min-p, bans, seeded Gumbel-max, logprobs.

Order (as torch_sample spells it): raw logprobs from the logits; penalties (worker.penalties); bans to
-inf; / temperature; top-k, then top-p on what top-k kept, then min-p on what both kept; processed
logprobs of the result. Ties rank by token id (stable sort), in the torch and in the fused samplers.

The random numbers come from a counter-based hash of (seed, step, token id),
so a request's samples are the same whatever else shares its batch, survive
preemption, and need no generator state or host round trip. Seeds are 63-bit;
for each step the hash keys a row on a bijection of its whole seed, so two
different seeds never share their random numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from worker import kernels
from worker.penalties import PenaltyTensors, apply_penalties

_MASK32 = 0xFFFFFFFF
_MASK63 = (1 << 63) - 1
_MUL = 0x45D9F3B
_SAMPLE_STRIDE = 0x9E3779B97F4A7C15  # odd, so index * stride tells the samples of a request apart


def sample_seed(seed: int, prompt: Sequence[int], index: int) -> int:
    """The 63-bit seed of sample `index` of a request with `seed` (0 <= seed < 2**63) and `prompt`.

    For a given prompt and index, different seeds give different sample seeds (no collisions);
    prompts sharing a seed get unrelated ones (keyed by Python's hash of the token ids, which is
    the same in every process).
    """
    return ((seed ^ (hash(tuple(prompt)) & _MASK63)) + index * _SAMPLE_STRIDE) & _MASK63


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (a bijection) on int64 tensors holding values in [0, 2**32)."""
    x = ((x >> 16) ^ x) * _MUL & _MASK32
    x = ((x >> 16) ^ x) * _MUL & _MASK32
    return (x >> 16) ^ x


def _row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's 64-bit key as two 32-bit halves (high, low): for a given step, a bijection of the seed."""
    high = seeds >> 32
    low = _mix(_mix((seeds & _MASK32) ^ _mix(high)) ^ (steps & _MASK32))
    return _mix(high ^ low), low


def hashed_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform (0, 1) floats [S, V], a pure function of (seed, step, column); seeds in [0, 2**63)."""
    high, low = _row_keys(seeds, steps)
    cols = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _mix(high[:, None] ^ _mix(low[:, None] ^ _mix(cols + 0x9E3779B9 & _MASK32)[None, :]))
    # 23 bits: (k + 0.5) / 2**23 is exact in float32, so u stays strictly inside (0, 1)
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


@dataclass
class SamplingTensors:
    """Per-row settings as device tensors (S rows).

    Ties rank by token id: top-k keeps, and top-p counts mass in, the order (scaled logit descending,
    token id ascending); top logprobs list tokens in that order too.
    """

    temperature: torch.Tensor  # float32 [S]; 0 = greedy (filters and processed logprobs at temperature 1)
    top_k: torch.Tensor  # int64 [S]; >= vocab disables
    top_p: torch.Tensor  # float32 [S]; >= 1 disables (ModelRunner stores 2.0)
    min_p: torch.Tensor  # float32 [S]; 0 disables
    seeds: torch.Tensor  # int64 [S]
    steps: torch.Tensor  # int64 [S]
    use_raw: torch.Tensor  # bool [S]; logprobs of the raw distribution
    banned_rows: torch.Tensor  # int64 [N] with banned_cols: (row, token) pairs masked out; row < 0 = padding
    banned_cols: torch.Tensor
    needs_sort: bool  # any row with top-k or top-p
    needs_min_p: bool
    max_top_logprobs: int  # 0..64: top logprobs returned for every row
    penalties: Optional[PenaltyTensors] = None  # repetition / presence / frequency penalties (worker.penalties)

    def is_plain(self) -> bool:
        """Only temperature / greedy and seeds: no filters, bans, penalties or top logprobs."""
        return not (self.needs_sort or self.needs_min_p or self.banned_rows.numel() or self.max_top_logprobs
                    or self.penalties is not None)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [S]
    logprobs: torch.Tensor  # [S] under each row's logprobs mode
    top_ids: torch.Tensor  # [S, K]
    top_logprobs: torch.Tensor  # [S, K]


def sample(logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
    """Sample one token per row of `logits` [S, V].

    On CUDA (with Triton) every batch runs fused Triton kernels, with no host sync and static shapes
    (CUDA-graph safe): plain batches the vocabulary-parallel sampler of `worker.kernels.sampling`, the
    others the chunk-parallel filtered sampler of `worker.kernels.filtered_sampling`. Both give `torch_sample`'s
    tokens for the same seeds and its logprobs up to float32 rounding; other devices run `torch_sample`.
    """
    if not kernels.use_for(logits):
        return torch_sample(logits, t)
    rows = logits.shape[0]
    if t.is_plain():
        from worker.kernels.sampling import fused_sample

        token_ids = torch.empty(rows, dtype=torch.int64, device=logits.device)
        logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
        fused_sample(logits, t.temperature, t.seeds, t.steps, t.use_raw, token_ids, logprobs)
        empty = torch.empty(rows, 0, device=logits.device)
        return SamplerOutput(token_ids, logprobs, empty.long(), empty)
    return fused_filtered_sample(logits, t)


def fused_filtered_sample(logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
    """The Triton sampler for any settings (CUDA, or Triton's interpreter on CPU tensors)."""
    from worker.kernels.filtered_sampling import filtered_sample
    from worker.kernels.penalties import prepare_logits

    if t.penalties is not None:
        t.penalties.check(*logits.shape)
    work = logits
    if t.penalties is not None or t.banned_rows.numel():
        work = prepare_logits(logits, t.penalties, t.banned_rows, t.banned_cols)
    out = filtered_sample(work, logits, t.temperature, t.top_k, t.top_p, t.min_p, t.seeds, t.steps, t.use_raw,
                          t.max_top_logprobs, filters=t.needs_sort, any_min_p=t.needs_min_p)
    return SamplerOutput(*out)


def torch_sample(logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
    """The sampler in torch ops: every feature, any device (the fused samplers' oracle)."""
    logits = logits.float()
    raw = torch.log_softmax(logits, dim=-1)
    if t.penalties is not None:
        t.penalties.check(*logits.shape)
        logits = apply_penalties(logits, t.penalties)
    if t.banned_rows.numel():
        logits = logits.masked_fill(_ban_mask(logits, t.banned_rows, t.banned_cols), float("-inf"))
    greedy = t.temperature == 0
    scaled = logits / torch.where(greedy, 1.0, t.temperature)[:, None]
    if t.needs_sort:
        scaled = _top_k_top_p(scaled, t.top_k, t.top_p)
    if t.needs_min_p:
        probs = torch.softmax(scaled, dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * t.min_p[:, None]
        scaled = scaled.masked_fill(probs < threshold, float("-inf"))
    processed = torch.log_softmax(scaled, dim=-1)
    noise = -torch.log(-torch.log(hashed_uniform(t.seeds, t.steps, logits.shape[-1])))
    sampled = (processed + noise).argmax(dim=-1)
    token_ids = torch.where(greedy, scaled.argmax(dim=-1), sampled)
    chosen = torch.where(t.use_raw[:, None], raw, processed)
    logprobs = chosen.gather(1, token_ids[:, None]).squeeze(1)
    if t.max_top_logprobs:
        top_logprobs, top_ids = chosen.sort(dim=-1, descending=True, stable=True)  # ties by token id
        top_logprobs, top_ids = top_logprobs[:, : t.max_top_logprobs], top_ids[:, : t.max_top_logprobs]
    else:
        top_logprobs, top_ids = chosen.topk(0, dim=-1)
    return SamplerOutput(token_ids, logprobs, top_ids, top_logprobs)


def _ban_mask(logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[S, V] bool, True at the banned (row, col) pairs; pairs with row < 0 (padding) ban nothing."""
    pad = rows < 0
    mask = torch.zeros(logits.shape[0], logits.shape[1] + 1, dtype=torch.bool, device=logits.device)
    mask[rows.clamp(min=0), torch.where(pad, logits.shape[1], cols)] = True
    return mask[:, :-1]


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask everything outside each row's top-k and then its top-p nucleus (at least one token stays).

    The sort is stable: of tied logits, the smaller token ids rank first (the fused sampler's order).
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
