"""The step loop: schedule, execute on the worker, append tokens, finish sequences."""

from __future__ import annotations

from typing import Optional

from rollout.block_manager import BlockManager
from rollout.config import EngineConfig
from rollout.sampling_params import SamplingParams
from rollout.scheduler import ScheduledSeq, Scheduler
from rollout.sequence import Sequence, Status
from worker.batch import Batch, SamplingInfo, SeqChunk, StepOutput
from worker.model_runner import Round
from worker.sampler import sample_seed
from worker.worker import Worker


class EngineCore:
    """Owns the scheduler and the block manager; drives one worker one step at a time."""

    def __init__(self, config: EngineConfig, worker: Worker, eos_token_ids: set[int], tokenizer=None):
        self.worker = worker
        self.max_model_len = worker.max_model_len
        self.eos_token_ids = eos_token_ids
        self.tokenizer = tokenizer
        self.block_manager = BlockManager(worker.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.num_decode_steps = config.num_decode_steps
        self._inflight: Optional[tuple[list[ScheduledSeq], Round]] = None  # a decode round queued on the device
        self.weight_version = 0
        self._next_seq_id = 0
        self._next_group = 0

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams, seed: int) -> list[Sequence]:
        """Queue the n samples of one prompt.

        Sample j's random numbers are keyed by (seed, prompt, j): reproducible whatever
        else is batched, and different prompts sharing one seed do not share noise.
        """
        group = self._next_group
        self._next_group += 1
        seqs = []
        for j in range(params.n):
            seq = Sequence(
                seq_id=self._next_seq_id,
                request_id=request_id,
                index=j,
                prompt_len=len(prompt),
                token_ids=list(prompt),
                params=params,
                seed=sample_seed(seed, prompt, j),
                group=group,
            )
            self._next_seq_id += 1
            self.scheduler.add(seq)
            seqs.append(seq)
        return seqs

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    def step(self) -> list[Sequence]:
        """Run one step (or one decode round of several); returns the sequences that finished in it.

        While decode rounds continue with the same sequences, the next round is queued on the device before
        this one's tokens are read, so the host's work on them overlaps the device's on the next.
        """
        if self._inflight is not None:
            return self._next_round(*self._inflight)
        num_steps = self._round_steps()
        scheduled = self.scheduler.schedule(num_steps)
        if not scheduled:
            return []
        samples = [item.samples for item in scheduled]
        started = self.worker.launch(Batch([self._chunk(s) for s in scheduled], num_steps))
        if num_steps > 1:
            return self._next_round(scheduled, started)
        output, finished, row = started.outputs()[0], [], 0
        for item, sampled in zip(scheduled, samples):
            seq = item.seq
            seq.num_computed += item.num_new
            self.block_manager.commit(seq)
            if not sampled:
                continue
            self._append(seq, output.token_ids[row], output.logprobs[row], output.top_logprobs[row])
            row += 1
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                finished.append(seq)
        return finished

    def drain(self) -> list[Sequence]:
        """Take the tokens of a round still on the device, starting no other (before weights change)."""
        if self._inflight is None:
            return []
        scheduled, started = self._inflight
        self._inflight = None
        return self._finish_round(scheduled, started.outputs())

    def _next_round(self, scheduled: list[ScheduledSeq], started: Round) -> list[Sequence]:
        self._inflight = None
        follow = self._follow_up(scheduled, started.num_steps)
        if follow:
            tables = [item.seq.block_table for item in scheduled]
            self._inflight = (scheduled, self.worker.resume(started, follow, tables))
        return self._finish_round(scheduled, started.outputs())

    def _follow_up(self, scheduled: list[ScheduledSeq], ahead: int) -> int:
        """Steps of a next round for the same sequences, queued before this round's tokens are read (0: none).

        Decided as if no sequence stops in this round (`ahead` steps); one that does wastes its next round.
        Blocks for the next round are allocated here.
        """
        sched = self.scheduler
        if self.num_decode_steps == 1 or (sched.waiting and len(sched.running) < sched.max_num_seqs):
            return 0
        limit, longest = self.num_decode_steps, 0
        for item in scheduled:
            seq = item.seq
            if seq.finished:
                return 0
            limit = min(limit, self.max_model_len - seq.num_tokens - ahead + 1)
            longest = max(longest, seq.params.max_tokens - seq.num_output - ahead)
        steps = min(limit, longest)
        if steps < 2 or sum(self.block_manager.blocks_needed(i.seq, ahead + steps) for i in scheduled) > \
                self.block_manager.num_free:
            return 0
        for item in scheduled:
            self.block_manager.allocate(item.seq, ahead + steps)
        return steps

    def _finish_round(self, scheduled: list[ScheduledSeq], outputs: list[StepOutput]) -> list[Sequence]:
        """Take each sequence's tokens of a decode round up to its first stop; the rest are discarded."""
        tokens = list(zip(*(o.token_ids for o in outputs)))
        logprobs = list(zip(*(o.logprobs for o in outputs)))
        finished = []
        for item, row_tokens, row_logprobs in zip(scheduled, tokens, logprobs):
            seq = item.seq
            if seq.finished:  # stopped in the round before: this one was computed for nothing
                continue
            seq.num_computed += self._append_round(seq, row_tokens, row_logprobs)
            self.block_manager.commit(seq)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                finished.append(seq)
        return finished

    def _append_round(self, seq: Sequence, tokens: tuple[int, ...], logprobs: tuple[float, ...]) -> int:
        """Append a round's tokens up to the first that stops the sequence; returns how many were taken.

        Same rules as `_append` token by token (stop tokens before length); rounds only run past min_tokens
        and without top logprobs, and stop strings take the token-by-token path.
        """
        p = seq.params
        if p.stop:
            for taken, (token, logprob) in enumerate(zip(tokens, logprobs), 1):
                self._append(seq, token, logprob, [])
                if seq.finish_reason is not None:
                    return taken
            return len(tokens)
        room = min(p.max_tokens - seq.num_output, self.max_model_len - seq.num_tokens)
        take = min(len(tokens), room)
        stops = self._stop_ids(p)
        hit = next((i for i in range(take) if tokens[i] in stops), None)
        if hit is not None:
            take = hit + 1
            seq.finish_reason = "stop"
            seq.stop_reason = tokens[hit] if tokens[hit] in p.stop_token_ids else None
        elif take == room:
            seq.finish_reason = "length"
        seq.token_ids.extend(tokens[:take])
        seq.weight_versions.extend([self.weight_version] * take)
        if p.logprobs:
            seq.logprobs.extend(logprobs[:take])
        return take

    def _stop_ids(self, p: SamplingParams) -> set[int]:
        return set(p.stop_token_ids) if p.ignore_eos else set(p.stop_token_ids) | self.eos_token_ids

    def _round_steps(self) -> int:
        """Decode steps the next round may run back to back (1 unless every running sequence decodes with
        plain sampling, nothing waits for a free slot and every sequence's blocks for the round fit)."""
        limit, sched = self.num_decode_steps, self.scheduler
        if limit == 1 or not sched.running or (sched.waiting and len(sched.running) < sched.max_num_seqs):
            return 1
        if len(sched.running) > sched.max_num_batched_tokens:
            return 1
        longest = 0
        for seq in sched.running:
            p = seq.params
            if seq.num_tokens - seq.num_computed != 1 or not _plain(p) or seq.num_output < p.min_tokens:
                return 1
            limit = min(limit, self.max_model_len - seq.num_tokens + 1)
            longest = max(longest, p.max_tokens - seq.num_output)
        steps = min(limit, longest)
        if steps <= 1 or sum(self.block_manager.blocks_needed(s, steps) for s in sched.running) > \
                self.block_manager.num_free:
            return 1
        return steps

    def abort_all(self) -> None:
        """Drop every queued and running sequence (after a failed step), keeping the engine usable."""
        if self._inflight is not None:  # let the device finish it before its blocks can be handed out again
            try:
                self._inflight[1].outputs()
            except Exception:  # noqa: BLE001 - the step already failed; its error is the one raised
                pass
            self._inflight = None
        self.scheduler.abort_all()

    def abort_inflight(self) -> int:
        """End every queued and running sequence now with finish_reason "abort", keeping its tokens; returns
        how many."""
        ended = self.scheduler.abort_all()
        for seq in ended:
            seq.status = Status.FINISHED
            seq.finish_reason = "abort"
        return len(ended)

    def _chunk(self, item: ScheduledSeq) -> SeqChunk:
        seq = item.seq
        start = seq.num_computed
        chunk = SeqChunk(seq.token_ids[start : start + item.num_new], start, list(seq.block_table))
        if item.samples:
            p = seq.params
            banned = []
            if seq.num_output < p.min_tokens:
                banned = sorted(self._stop_ids(p))
            chunk.sampling = SamplingInfo(
                temperature=p.temperature,
                top_k=p.top_k,
                top_p=p.top_p,
                min_p=p.min_p,
                seed=seq.seed,
                step=seq.num_output,
                logprobs_mode=p.logprobs_mode if (p.logprobs or p.top_logprobs) else None,
                top_logprobs=p.top_logprobs,
                banned_token_ids=banned,
            )
        return chunk

    def _append(self, seq: Sequence, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
        seq.token_ids.append(token)
        seq.weight_versions.append(self.weight_version)
        if seq.params.logprobs:
            seq.logprobs.append(logprob)
        if seq.params.top_logprobs:
            seq.top_logprobs.append(dict(top))
        reason, stop = self._stop_reason(seq, token)
        if reason is not None:
            seq.finish_reason, seq.stop_reason = reason, stop

    def _stop_reason(self, seq: Sequence, token: int) -> tuple[Optional[str], Optional[int | str]]:
        p = seq.params
        if seq.num_output >= p.min_tokens:
            if token in p.stop_token_ids:
                return "stop", token
            if not p.ignore_eos and token in self.eos_token_ids:
                return "stop", None
            if p.stop and self._find_stop_string(seq):
                return "stop", seq.stop_reason
        if seq.num_output >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length", None
        return None, None

    def _find_stop_string(self, seq: Sequence) -> bool:
        """Decode the output; on a stop string, keep the text before it and record which one."""
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        found = [(text.find(s), s) for s in seq.params.stop if s in text]
        if not found:
            return False
        index, stop = min(found)
        seq.text, seq.stop_reason = text[:index], stop
        return True


def _plain(p: SamplingParams) -> bool:
    """Sampling the device's fused sampler covers: temperature or greedy, no filters or top logprobs."""
    return p.top_k <= 0 and p.top_p >= 1.0 and p.min_p == 0 and not p.top_logprobs
