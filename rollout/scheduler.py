"""Continuous batching: which sequences compute how many tokens in the next step.

Every step has a token budget (max_num_batched_tokens) and a sequence cap
(max_num_seqs). Running sequences go first (one token each when decoding, the
rest of their prompt otherwise); waiting ones are admitted in arrival order
while budget and blocks last. A prompt longer than the remaining budget is
prefilled in chunks over several steps. The n samples of a prompt wait while
one of them computes the prompt's full blocks; then they are admitted together,
each sharing those blocks (reference counts) and computing only the rest of its
prompt. When blocks run out, the most recently admitted running sequence is
preempted: its blocks are freed and it is recomputed later from its prompt plus
the tokens it already produced.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

from rollout.block_manager import BlockManager
from rollout.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int

    @property
    def samples(self) -> bool:
        """Whether this step computes the sequence's last token, and so produces its next one."""
        return self.seq.num_computed + self.num_new == self.seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_waiting: Counter[int] = Counter()  # group -> its sequences in `waiting`
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.num_waiting[seq.group] += 1

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, num_steps: int = 1) -> list[ScheduledSeq]:
        """The next step's sequences. With num_steps > 1 (a decode round, see EngineCore) every running
        sequence gets blocks for that many tokens and nothing is admitted."""
        if num_steps > 1:  # EngineCore checked that every running sequence decodes and its blocks fit
            for seq in self.running:
                self.blocks.allocate(seq, num_steps)
            return [ScheduledSeq(seq, 1) for seq in self.running]
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preemptions = self.num_preemptions
        while len(scheduled) < len(self.running) and budget > 0:
            seq = self.running[len(scheduled)]
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            if not self._make_room(seq, num_new):
                break
            self.blocks.allocate(seq, num_new)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        if self.num_preemptions == preemptions:
            self._admit(scheduled, budget)
        return scheduled

    def _make_room(self, seq: Sequence, num_new: int) -> bool:
        """Preempt from the back of `running` until `seq` fits; False if `seq` itself was preempted."""
        while self.blocks.blocks_needed(seq, num_new) > self.blocks.num_free:
            victim = self.running.pop()
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_waiting[seq.group] += 1
        self.num_preemptions += 1

    def _admit(self, scheduled: list[ScheduledSeq], budget: int) -> None:
        """Admit waiting sequences in order; the samples of a prompt wait while one of them computes the
        prompt's full blocks, and then all come in at once, each matching those blocks."""
        filling = {s.group for s in self.running if self._fills_prompt(s)}
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            if seq.group in filling:
                deferred.append(seq)
                continue
            hits = self.blocks.match_prefix(seq)
            num_new = min(seq.num_tokens - len(hits) * self.blocks.block_size, budget)
            if self.blocks.blocks_needed(seq, num_new, hits) > self.blocks.num_free:
                self.waiting.appendleft(seq)
                break
            self.blocks.allocate(seq, num_new, hits)
            seq.status = Status.RUNNING
            self._count_out(seq)
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            if self._fills_prompt(seq):
                filling.add(seq.group)
        self.waiting.extendleft(reversed(deferred))

    def _fills_prompt(self, seq: Sequence) -> bool:
        """Whether the sequence has yet to compute full prompt blocks that other samples of its prompt share."""
        return seq.num_computed < self.blocks.num_prompt_blocks(seq) * self.blocks.block_size

    def _count_out(self, seq: Sequence) -> None:
        self.num_waiting[seq.group] -= 1
        if not self.num_waiting[seq.group]:
            del self.num_waiting[seq.group]

    def finish(self, seq: Sequence) -> None:
        """Release a finished sequence's blocks (its full prompt blocks stay findable while its siblings wait)."""
        seq.status = Status.FINISHED
        self.running.remove(seq)
        self.blocks.free(seq, keep_prompt=seq.group in self.num_waiting)

    def abort_all(self) -> list[Sequence]:
        """Drop every sequence (used when a step fails); returns them."""
        dropped = list(self.running) + list(self.waiting)
        for seq in self.running:
            self.blocks.free(seq)
        self.running.clear()
        self.waiting.clear()
        self.num_waiting.clear()
        if not self.blocks.enable_prefix_caching:  # forget prompt blocks kept for samples that will not come
            self.blocks.reset_prefix_cache()
        return dropped
