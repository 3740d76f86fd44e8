"""The engine core: requests in and out at any time, one step loop (schedule -> launch -> postprocess)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence as Seq

import numpy as np

from rollout.block_manager import BlockManager
from rollout.config import EngineConfig
from rollout.routes import RoutedRows
from rollout.sampling_params import SamplingParams
from rollout.scheduler import ScheduledSeq, Scheduler, StepPlan
from rollout.sequence import PromptScores, Sequence, Status
from rollout.serving import ServingWeights
from rollout.stopping import StopRules
from worker.sampler import sample_seed
from worker.steps import Batch, PenaltyInfo, Round, SamplingInfo, SeqChunk
from worker.worker import Worker


@dataclass
class Launched:
    """A step started on the device whose tokens have not been read yet."""

    plan: StepPlan
    round: Round


@dataclass
class Progress:
    """A sequence that produced tokens or ended in a step: its outputs from index `start` on are new."""

    seq: Sequence
    start: int


@dataclass
class Continuation:
    """An earlier partial sample to continue: its output tokens so far, their logprobs / top logprobs (when the
    request asks for them) and weight versions, the sample index its random numbers are keyed on, and its routed
    experts (when the request asks for them and the partial sample has them)."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]]
    weight_versions: list[int]
    index: int
    routed_experts: Optional[np.ndarray] = None


class EngineCore:
    """Owns the scheduler, the block manager and the serving weight version; drives one worker.

    Requests are added (`add_request`) and aborted (`abort_request`) between any two
    steps. Each `step` reports the sequences that progressed in it. A decode round is
    read one step later, after the next round for the same sequences has been queued
    behind it, so the host's work on its tokens overlaps the device's next round: the
    round still on the device is the value `step` takes and returns.
    """

    def __init__(self, config: EngineConfig, worker: Worker, eos_token_ids: set[int], tokenizer=None):
        self.worker = worker
        self.stops = StopRules(eos_token_ids, worker.max_model_len, tokenizer)
        self.block_manager = BlockManager(worker.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.num_decode_steps, worker.max_model_len)
        self.serving = ServingWeights(self.block_manager)
        self._next_seq_id = 0
        self._next_group = 0

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams, seed: int,
                    continuation: Optional[Continuation] = None) -> list[Sequence]:
        """Queue the n samples of one prompt (or continue one earlier sample); returns them.

        Sample j's random numbers are keyed by (seed, prompt, j) and the position of each
        token after the prompt: reproducible whatever else is batched, different prompts
        sharing one seed do not share noise, and a continued sample draws what it would
        have drawn uninterrupted.
        """
        group, self._next_group = self._next_group, self._next_group + 1
        done = continuation or Continuation([], [], [], [], 0)
        indices = [done.index] if continuation else range(params.n)
        seqs = []
        for j in indices:
            seq = Sequence(seq_id=self._next_seq_id, request_id=request_id, index=j, prompt_len=len(prompt),
                           token_ids=list(prompt) + done.token_ids, params=params,
                           seed=sample_seed(seed, prompt, j), group=group,
                           max_output=len(done.token_ids) + params.max_tokens, logprobs=list(done.logprobs),
                           top_logprobs=list(done.top_logprobs), weight_versions=list(done.weight_versions))
            self._next_seq_id += 1
            if params.prompt_logprobs is not None and not seqs:  # the first sample scores the prompt, once
                seq.scores = PromptScores.for_prompt(len(prompt), params.prompt_logprobs)
            if params.return_routed_experts:
                seq.routes = self._routed_rows(len(prompt) + len(done.token_ids))
                if done.routed_experts is not None:
                    seq.routes.give(done.routed_experts)
            self.scheduler.add(seq)
            seqs.append(seq)
        return seqs

    def _routed_rows(self, num_tokens: int) -> RoutedRows:
        blocks = self.worker.model.moe_blocks()
        return RoutedRows(len(blocks), blocks[0].top_k, num_tokens + 64)

    def abort_request(self, seqs: Seq[Sequence]) -> list[Progress]:
        """End these sequences now with finish_reason "abort", keeping what they produced; returns those
        that were still going."""
        going = [seq for seq in seqs if not seq.finished]
        self.scheduler.abort(going)
        for seq in going:
            seq.finish_reason = "abort"
        return [Progress(seq, seq.num_output) for seq in going]

    def abort_all(self) -> list[Progress]:
        """`abort_request` for every sequence queued or running."""
        return self.abort_request(self.scheduler.running + list(self.scheduler.waiting))

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self, queued: Optional[Launched]) -> tuple[Optional[Launched], list[Progress]]:
        """One turn: schedule -> launch -> postprocess. `queued` is the decode round the previous turn left on
        the device; returns the one this turn leaves, and the sequences that progressed."""
        if queued is None:
            plan = self.scheduler.schedule()
            if plan is None:
                return None, []
            launched = Launched(plan, self.worker.launch(self._batch(plan)))
            if plan.num_steps > 1:  # read next turn, once the next round is queued behind it
                return launched, []
            return None, self._postprocess(launched)
        plan = self.scheduler.follow_up(queued.plan)
        launched = None
        if plan is not None:
            tables = [item.seq.block_table for item in plan.items]
            launched = Launched(plan, self.worker.resume(queued.round, plan.num_steps, tables))
        return launched, self._postprocess(queued)

    def drain(self, queued: Optional[Launched]) -> list[Progress]:
        """Read a round still on the device, starting no other (before the weights or the cache change)."""
        return [] if queued is None else self._postprocess(queued)

    def fail(self, queued: Optional[Launched]) -> list[Sequence]:
        """After a step raised: wait out the device's queued work, drop every sequence and return them."""
        if queued is not None:
            try:
                queued.round.outputs()
            except Exception:  # noqa: BLE001 - the step already failed; its error is the one reported
                pass
        dropped = self.scheduler.abort_all()
        for seq in dropped:
            seq.status = Status.FINISHED
            seq.finish_reason = "abort"
        return dropped

    def _postprocess(self, launched: Launched) -> list[Progress]:
        """Take each sequence's new tokens (a round's up to its first stop; the rest are discarded)."""
        outputs = launched.round.outputs()
        routes = launched.round.routed_experts()
        version = self.serving.version
        progress, row, token = [], 0, 0
        for index, item in enumerate(launched.plan.items):
            seq, r, t = item.seq, row, token
            row += item.samples
            token += item.num_new
            if seq.finished:  # aborted meanwhile, or stopped in the round before (this one ran for nothing)
                continue
            if index in outputs[0].prompt_logprobs:
                seq.scores.put(seq.num_computed, *outputs[0].prompt_logprobs[index])
            if not item.samples:  # a prefill chunk before the prompt's last
                if seq.routes is not None:
                    seq.routes.put(seq.num_computed, routes[0, t : t + item.num_new])
                seq.num_computed += item.num_new
                self.block_manager.commit(seq)
                continue
            start = seq.num_output
            taken = self.stops.take(seq, [o.token_ids[r] for o in outputs], [o.logprobs[r] for o in outputs],
                                    [o.top_logprobs[r] for o in outputs], version)
            if seq.routes is not None:  # a round's steps compute one token each
                rows = routes[:taken, t] if len(outputs) > 1 else routes[0, t : t + item.num_new]
                seq.routes.put(seq.num_computed, rows)
            seq.num_computed += item.num_new + taken - 1
            self.block_manager.commit(seq)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
            progress.append(Progress(seq, start))
        return progress

    def _batch(self, plan: StepPlan) -> Batch:
        routes = any(item.seq.routes is not None for item in plan.items)
        return Batch([self._chunk(item) for item in plan.items], plan.num_steps, routes)

    def _chunk(self, item: ScheduledSeq) -> SeqChunk:
        seq = item.seq
        start = seq.num_computed
        chunk = SeqChunk(seq.token_ids[start : start + item.num_new], start, list(seq.block_table))
        if seq.scoring:  # prompt token i + 1 is scored at row i
            end = min(start + item.num_new, seq.prompt_len - 1)
            chunk.score_targets, chunk.score_top = seq.token_ids[start + 1 : end + 1], seq.scores.top
        if item.samples:
            p = seq.params
            chunk.sampling = SamplingInfo(
                temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p, seed=seq.seed,
                step=seq.num_output,
                logprobs_mode=p.logprobs_mode if (p.logprobs or p.top_logprobs) else None,
                top_logprobs=p.top_logprobs,
                banned_token_ids=sorted(self.stops.stop_ids(p)) if seq.num_output < p.min_tokens else [],
                min_tokens=p.min_tokens,
                penalties=_penalties(seq),
            )
        return chunk


def _penalties(seq: Sequence) -> Optional[PenaltyInfo]:
    """The sequence's penalties and the tokens they count (None when it has none)."""
    p = seq.params
    if p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0:
        return None
    return PenaltyInfo(p.repetition_penalty, p.presence_penalty, p.frequency_penalty,
                       seq.token_ids[: seq.prompt_len], seq.token_ids[seq.prompt_len:])
