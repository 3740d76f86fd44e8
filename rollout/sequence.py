"""One sample's state as it moves through the scheduler."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from rollout.routes import RoutedRows
from rollout.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class PromptScores:
    """Prompt logprobs of one request, filled chunk by chunk: entry i is prompt token i + 1's raw logprob and
    its `top` most likely (token, logprob) pairs (i = 0 .. prompt length - 2)."""

    top: int
    logprobs: list[float]
    top_logprobs: list[dict[int, float]]
    num_scored: int = 0

    @classmethod
    def for_prompt(cls, prompt_len: int, top: int) -> "PromptScores":
        n = max(prompt_len - 1, 0)
        return cls(top, [0.0] * n, [{} for _ in range(n)] if top else [])

    @property
    def done(self) -> bool:
        return self.num_scored >= len(self.logprobs)

    def put(self, start: int, logprobs: list[float], top: list[list[tuple[int, float]]]) -> None:
        """Entries start .. start + len(logprobs) - 1 (a recomputed chunk writes the same values again)."""
        self.logprobs[start : start + len(logprobs)] = logprobs
        if self.top:
            self.top_logprobs[start : start + len(top)] = [dict(t) for t in top]
        self.num_scored = max(self.num_scored, start + len(logprobs))


@dataclass
class Sequence:
    """Tokens (prompt + output so far), how many are in the KV cache, and the blocks holding them.

    `group` ties the n samples of one prompt together (they share prompt blocks);
    `index` is the sample's position in its request. A sample that continues an earlier
    partial one starts with that sample's tokens, logprobs and versions as output;
    `max_output` is the output length it may reach (those tokens + max_tokens).
    `routes` holds its routed experts when the request asks for them.
    """

    seq_id: int
    request_id: str
    index: int
    prompt_len: int
    token_ids: list[int]
    params: SamplingParams
    seed: int
    group: int
    max_output: int
    status: Status = Status.WAITING
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    weight_versions: list[int] = field(default_factory=list)  # per output token: the weights that produced it
    cache_epoch: int = 0  # the prefix-cache epoch its block hashes chain from
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: Optional[int | str] = None
    text: Optional[str] = None
    routes: Optional[RoutedRows] = None  # with return_routed_experts (see rollout/routes.py)
    scores: Optional[PromptScores] = None  # with prompt_logprobs: on the request's first sample only

    @property
    def scoring(self) -> bool:
        """Whether it has prompt tokens left to score (it then computes its whole prompt: no prefix-cache hits)."""
        return self.scores is not None and not self.scores.done

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def started(self) -> bool:
        """Whether it has computed or produced anything (a request in flight, not merely queued)."""
        return self.num_computed > 0 or bool(self.block_table) or self.num_output > 0

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
