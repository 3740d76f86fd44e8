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
