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

The scheduler also plans decode rounds: when every running sequence decodes
(any sampling settings) and nothing waits for a slot, one step may run several
decode steps back to back on the device (`num_decode_steps`), and the next round
for the same sequences may be queued behind it before its tokens are read
(`follow_up`).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Optional

from rollout.block_manager import BlockManager
from rollout.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int
    samples: bool  # whether this step computes the sequence's last token, and so produces its next one


@dataclass
class StepPlan:
    """The sequences of one step and the tokens each computes; `num_steps` > 1 is a decode round."""

    items: list[ScheduledSeq]
    num_steps: int = 1


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 num_decode_steps: int = 1, max_model_len: int = 1 << 62):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_decode_steps = num_decode_steps
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_waiting: Counter[int] = Counter()  # group -> its sequences in `waiting`
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.num_waiting[seq.group] += 1

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Optional[StepPlan]:
        """The next step: a decode round of every running sequence when one may run, else one step under the
        token budget (running sequences first, then admissions); None when there is nothing to run."""
        num_steps = self._round_steps()
        if num_steps > 1:
            for seq in self.running:
                self.blocks.allocate(seq, num_steps)
            return StepPlan([ScheduledSeq(seq, 1, True) for seq in self.running], num_steps)
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preemptions = self.num_preemptions
        while len(scheduled) < len(self.running) and budget > 0:
            seq = self.running[len(scheduled)]
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            if not self._make_room(seq, num_new):
                break
            self._allocate(scheduled, seq, num_new)
            budget -= num_new
        if self.num_preemptions == preemptions:
            self._admit(scheduled, budget)
        return StepPlan(scheduled) if scheduled else None

    def follow_up(self, plan: StepPlan) -> Optional[StepPlan]:
        """A next round for a decode round's sequences, to queue behind it before its tokens are read; None
        when there is none (a slot is wanted, a sequence ended, or the blocks do not fit).

        Decided as if no sequence stops in `plan` (each `plan.num_steps` ahead); one that does wastes its next
        round. Blocks for the next round are allocated here.
        """
        ahead = plan.num_steps
        if self.num_decode_steps == 1 or ahead == 1 or self._slot_wanted():
            return None
        limit, longest = self.num_decode_steps, 0
        for item in plan.items:
            seq = item.seq
            if seq.finished:
                return None
            limit = min(limit, self.max_model_len - seq.num_tokens - ahead + 1)
            longest = max(longest, seq.max_output - seq.num_output - ahead)
        steps = min(limit, longest)
        if steps < 2 or sum(self.blocks.blocks_needed(i.seq, ahead + steps) for i in plan.items) > \
                self.blocks.num_free:
            return None
        for item in plan.items:
            self.blocks.allocate(item.seq, ahead + steps)
        return StepPlan(plan.items, steps)

    def _round_steps(self) -> int:
        """Decode steps the next step may run back to back (1 unless every running sequence decodes, nothing
        waits for a slot and the round's blocks fit)."""
        if self.num_decode_steps == 1 or not self.running or self._slot_wanted():
            return 1
        if len(self.running) > self.max_num_batched_tokens:
            return 1
        limit, longest = self.num_decode_steps, 0
        for seq in self.running:
            if seq.num_tokens - seq.num_computed != 1:
                return 1
            limit = min(limit, self.max_model_len - seq.num_tokens + 1)
            longest = max(longest, seq.max_output - seq.num_output)
        steps = min(limit, longest)
        if steps <= 1 or sum(self.blocks.blocks_needed(s, steps) for s in self.running) > self.blocks.num_free:
            return 1
        return steps

    def _slot_wanted(self) -> bool:
        return bool(self.waiting) and len(self.running) < self.max_num_seqs

    def _allocate(self, scheduled: list[ScheduledSeq], seq: Sequence, num_new: int, hits: list[int] = ()) -> None:
        self.blocks.allocate(seq, num_new, hits)
        scheduled.append(ScheduledSeq(seq, num_new, seq.num_computed + num_new == seq.num_tokens))

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
            hits = [] if seq.scoring else self.blocks.match_prefix(seq)
            num_new = min(seq.num_tokens - len(hits) * self.blocks.block_size, budget)
            if self.blocks.blocks_needed(seq, num_new, hits) > self.blocks.num_free:
                self.waiting.appendleft(seq)
                break
            self._allocate(scheduled, seq, num_new, hits)
            seq.status = Status.RUNNING
            self._count_out(seq)
            self.running.append(seq)
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

    def abort(self, seqs: list[Sequence]) -> None:
        """End these sequences now, wherever they are (waiting or running), releasing their blocks.

        A sequence in a decode round still on the device keeps nothing: the device's later writes to its
        blocks are ordered before any step that reuses them (one stream)."""
        for seq in seqs:
            if seq.finished:
                continue
            if seq.status is Status.RUNNING:
                self.running.remove(seq)
                self.blocks.free(seq)
            else:
                self.waiting.remove(seq)
                self._count_out(seq)
            seq.status = Status.FINISHED

    def preempt_all(self) -> None:
        """Send every running sequence back to waiting, to be recomputed (the KV cache is about to go)."""
        while self.running:
            self._preempt(self.running.pop())

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

