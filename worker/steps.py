"""The worker's step types: what the engine core hands a worker each step (`Batch` of `SeqChunk`s with their
`SamplingInfo`), and what comes back (a `Round` of `StepOutput`s). Internal: not part of the public API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from worker.sampler import SamplerOutput


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
    banned_token_ids: list[int] = field(default_factory=list)  # banned while step < min_tokens
    min_tokens: int = 0
    penalties: Optional["PenaltyInfo"] = None


@dataclass
class PenaltyInfo:
    """Repetition / presence / frequency penalties of one sequence (see `worker.penalties`) and the tokens they
    count: the prompt's and the output's so far (the device keeps counting the tokens a round samples)."""

    repetition: float
    presence: float
    frequency: float
    prompt_ids: list[int]
    output_ids: list[int]


@dataclass
class SeqChunk:
    """One sequence's share of a step: the tokens to compute and where its KV lives."""

    token_ids: list[int]
    start_pos: int  # tokens of this sequence already in the cache
    block_table: list[int]
    sampling: Optional[SamplingInfo] = None  # set when this step produces the next token
    score_targets: list[int] = field(default_factory=list)  # prompt scoring: the token after each of the first rows
    score_top: int = 0  # and how many most likely tokens to list at each


@dataclass
class Batch:
    """The chunks of one step; with num_steps > 1 (pure decode only) the worker runs that many decode steps,
    each feeding the tokens sampled by the one before. `routed_experts`: copy out every step's routed experts
    (MoE models)."""

    chunks: list[SeqChunk]
    num_steps: int = 1
    routed_experts: bool = False


@dataclass
class StepOutput:
    """Per sampling chunk (in batch order): the new token, its logprob, its top logprobs (one per step run);
    when asked for, the step's routed experts, int16 [tokens, MoE layers, top_k] in the batch's token order, and
    the scores of chunks with `score_targets`."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    routed_experts: Optional[np.ndarray] = None
    # prompt scoring: chunk index in the batch -> (raw logprob of each target, the top (token, logprob) pairs)
    prompt_logprobs: dict[int, tuple[list[float], list[list[tuple[int, float]]]]] = field(default_factory=dict)


class Round:
    """Steps started on the device; `outputs()` waits for them (the host's one synchronisation).

    `chunks` (eager rounds) are the last step's, for `ModelRunner.resume`; a round with `advanced_on_device`
    (replayed from a CUDA graph) left the next step's inputs on the device, and resumes from them.
    `with_routes`: its steps copy out their routed experts.
    """

    def __init__(self, num_steps: int, chunks: Optional[list[SeqChunk]] = None,
                 ready: Optional[list[StepOutput]] = None, advanced_on_device: bool = False,
                 with_routes: bool = False):
        self.num_steps = num_steps
        self.chunks = chunks
        self.advanced_on_device = advanced_on_device
        self.with_routes = with_routes
        self._ready = ready
        self._host: Optional[torch.Tensor] = None
        self._host_routes: Optional[torch.Tensor] = None
        self._event: Optional[torch.cuda.Event] = None
        self.top_counts: list[int] = []
        self._num_top = 0

    @classmethod
    def started(cls, out: SamplerOutput, num_steps: int, routes: Optional[torch.Tensor] = None,
                top_counts: Optional[list[int]] = None) -> "Round":
        """A round of tokens still on the device ([num_steps, B]; top logprobs [num_steps, B, K]), with its routed
        experts ([num_steps, B, MoE layers, top_k]) when given: copy them out asynchronously, in one packed copy.
        `top_counts`: the top logprobs each row asked for (<= K; default none)."""
        rnd = cls(num_steps, advanced_on_device=True, with_routes=routes is not None)
        rows = out.token_ids.shape[1]
        rnd.top_counts = top_counts or [0] * rows
        rnd._num_top = out.top_ids.shape[2]
        packed = torch.cat([out.token_ids.T.double(), out.logprobs.T.double(),
                            out.top_ids.transpose(0, 1).reshape(rows, -1).double(),
                            out.top_logprobs.transpose(0, 1).reshape(rows, -1).double()], dim=1)
        rnd._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        rnd._host.copy_(packed, non_blocking=True)
        if routes is not None:
            rnd._host_routes = torch.empty(routes.shape, dtype=routes.dtype, pin_memory=True)
            rnd._host_routes.copy_(routes, non_blocking=True)
        rnd._event = torch.cuda.Event()
        rnd._event.record()
        return rnd

    def outputs(self) -> list[StepOutput]:
        """One StepOutput per step."""
        if self._ready is None:
            self._event.synchronize()
            rows, k = self._host.tolist(), self.num_steps
            routes = None if self._host_routes is None else self._host_routes.numpy()
            self._ready = [StepOutput([int(r[j]) for r in rows], [r[k + j] for r in rows], self._top(rows, j),
                                      None if routes is None else routes[j]) for j in range(k)]
        return self._ready

    def _top(self, rows: list[list[float]], j: int) -> list[list[tuple[int, float]]]:
        """Step j's top logprobs of each row, from the packed host copy (ids after the tokens and logprobs)."""
        k, K = self.num_steps, self._num_top
        ids, vals = 2 * k + j * K, 2 * k + k * K + j * K
        return [[(int(r[ids + i]), r[vals + i]) for i in range(n)] for r, n in zip(rows, self.top_counts)]

    def routed_experts(self) -> Optional[np.ndarray]:
        """The steps' routed experts, int16 [num_steps, tokens per step, MoE layers, top_k] (every step of a round
        has one token per sequence), or None when not copied out."""
        if not self.with_routes:
            return None
        if self._host_routes is not None:
            self.outputs()
            return self._host_routes.numpy()
        return np.stack([o.routed_experts for o in self.outputs()])
