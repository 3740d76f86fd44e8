"""Sampling on the device: temperature, top-k, top-p, min-p, seeded Gumbel-max, logprobs.

The random numbers come from a counter-based hash of (seed, step, token id),
so a request's samples are the same whatever else shares its batch, survive
preemption, and need no generator state or host round trip. Seeds are 63-bit;
for each step the hash keys a row on a bijection of its whole seed, so two
different seeds never share their random numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from worker import kernels

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
    """Per-row settings as device tensors (S rows)."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_k: torch.Tensor  # int64; >= vocab disables
    top_p: torch.Tensor  # float32
    min_p: torch.Tensor  # float32
    seeds: torch.Tensor  # int64
    steps: torch.Tensor  # int64
    use_raw: torch.Tensor  # bool; logprobs of the raw distribution
    banned_rows: torch.Tensor  # int64 [N] with banned_cols: (row, token) pairs masked out
    banned_cols: torch.Tensor
    needs_sort: bool  # any row with top-k or top-p
    needs_min_p: bool
    max_top_logprobs: int

    def is_plain(self) -> bool:
        """Only temperature / greedy and seeds: no filters, bans or top logprobs."""
        return not (self.needs_sort or self.needs_min_p or self.banned_rows.numel() or self.max_top_logprobs)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [S]
    logprobs: torch.Tensor  # [S] under each row's logprobs mode
    top_ids: torch.Tensor  # [S, K]
    top_logprobs: torch.Tensor  # [S, K]


def sample(logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
    """Sample one token per row of `logits` [S, V].

    On CUDA, batches without top-k / top-p / min-p, banned tokens or top logprobs
    run the fused Triton sampler (same tokens); everything else runs `torch_sample`.
    """
    if kernels.use_for(logits) and t.is_plain():
        from worker.kernels.sampling import fused_sample

        rows = logits.shape[0]
        token_ids = torch.empty(rows, dtype=torch.int64, device=logits.device)
        logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
        fused_sample(logits, t.temperature, t.seeds, t.steps, t.use_raw, token_ids, logprobs)
        empty = torch.empty(rows, 0, device=logits.device)
        return SamplerOutput(token_ids, logprobs, empty.long(), empty)
    return torch_sample(logits, t)


def torch_sample(logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
    """The sampler in torch ops: every feature, any device."""
    logits = logits.float()
    raw = torch.log_softmax(logits, dim=-1)
    if t.banned_rows.numel():
        logits = logits.index_put((t.banned_rows, t.banned_cols), torch.tensor(float("-inf"), device=logits.device))
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
    top_logprobs, top_ids = chosen.topk(t.max_top_logprobs, dim=-1)
    return SamplerOutput(token_ids, logprobs, top_ids, top_logprobs)


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask everything outside each row's top-k and then its top-p nucleus (at least one token stays)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
