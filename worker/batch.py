"""What the engine core hands a worker each step, and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class SamplingInfo:
    """Sampling settings of one sequence that produces a token this step.

    `seed` and `step` (the index of the token being produced) key the random
    numbers, so a sample does not depend on what else is in the batch.
    """

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int
    step: int
    logprobs_mode: Optional[str] = None  # None, "processed" or "raw"
    top_logprobs: int = 0
    banned_token_ids: list[int] = field(default_factory=list)


@dataclass
class SeqChunk:
    """One sequence's share of a step: the tokens to compute and where its KV lives."""

    token_ids: list[int]
    start_pos: int  # tokens of this sequence already in the cache
    block_table: list[int]
    sampling: Optional[SamplingInfo] = None  # set when this step produces the next token


@dataclass
class Batch:
    """The chunks of one step; with num_steps > 1 (pure decode only) the worker runs that many decode steps,
    each feeding the tokens sampled by the one before."""

    chunks: list[SeqChunk]
    num_steps: int = 1


@dataclass
class StepOutput:
    """Per sampling chunk (in batch order): the new token, its logprob, its top logprobs (one per step run)."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
