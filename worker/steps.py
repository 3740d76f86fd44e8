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
    each feeding the tokens sampled by the one before. `routed_experts`: copy out every step's routed experts
    (MoE models)."""

    chunks: list[SeqChunk]
    num_steps: int = 1
    routed_experts: bool = False


@dataclass
class StepOutput:
    """Per sampling chunk (in batch order): the new token, its logprob, its top logprobs (one per step run);
    when asked for, the step's routed experts, int16 [tokens, MoE layers, top_k] in the batch's token order."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    routed_experts: Optional[np.ndarray] = None


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

    @classmethod
    def started(cls, out: SamplerOutput, num_steps: int, routes: Optional[torch.Tensor] = None) -> "Round":
        """A round of plain-sampled tokens still on the device ([num_steps, B]), with its routed experts
        ([num_steps, B, MoE layers, top_k]) when given: copy them out asynchronously."""
        rnd = cls(num_steps, advanced_on_device=True, with_routes=routes is not None)
        packed = torch.cat([out.token_ids.T.double(), out.logprobs.T.double()], dim=1)
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
            empty = [[] for _ in rows]
            routes = None if self._host_routes is None else self._host_routes.numpy()
            self._ready = [StepOutput([int(r[j]) for r in rows], [r[k + j] for r in rows], empty,
                                      None if routes is None else routes[j]) for j in range(k)]
        return self._ready

    def routed_experts(self) -> Optional[np.ndarray]:
        """The steps' routed experts, int16 [num_steps, tokens per step, MoE layers, top_k] (every step of a round
        has one token per sequence), or None when not copied out."""
        if not self.with_routes:
            return None
        if self._host_routes is not None:
            self.outputs()
            return self._host_routes.numpy()
        return np.stack([o.routed_experts for o in self.outputs()])
