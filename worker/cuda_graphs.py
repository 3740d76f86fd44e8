"""Decode steps replayed from CUDA graphs, one per padded batch size.

A graph covers the whole step after the inputs are on the device: the cache
slots from positions and block tables, embedding,
every layer (Triton attention included), the final norm, the LM head and the
sampler. Inputs live in static device buffers, filled by two copies from pinned
host memory; padding rows have seq_len 0 and slot -1, so they read nothing and
write nothing. The graphs hold the addresses of the weights and the KV cache,
which sleep / wake keep (the memory pool maps them back in place), and of their
own activations, kept in one private memory pool shared by all sizes.

Plain sampling (temperature / greedy) is captured for every size up front. Any other setting replays a
graph of a `Mode` (which passes of the fused filtered sampler run, how many top logprobs, penalties or
not), captured on first use for that size and mode (at a launch: no round is on the device then). Its
per-row settings are static inputs too: top-k, top-p, min-p, penalty factors, the (row, token) ban pairs
(padded with row -1; a row's bans hold while its step index is below its min_tokens, decided on the
device, so a round runs past min_tokens without the host) and, with penalties, the rows' prompt masks and
output counts, which each step updates with its sampled tokens (`record_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch

from worker.attention import AttentionBackend, AttentionMetadata
from worker.models.llama import CausalLM, ForwardContext
from worker.penalties import PenaltyTensors, fill_penalty_state, record_tokens
from worker.sampler import SamplerOutput, SamplingTensors, sample

INT_FIELDS = ("input_ids", "positions", "slot_mapping", "seq_lens", "seeds", "steps", "use_raw", "top_k",
              "min_tokens")
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition", "presence", "frequency")
FLOAT_PADDING = (0.0, 2.0, 0.0, 1.0, 0.0, 0.0)  # settings of padding rows: greedy, nothing filtered or penalized
BANS_PER_ROW = 8  # ban pairs room: BANS_PER_ROW * max_batch in all (a batch with more runs eagerly)


class Mode(NamedTuple):
    """The sampler a graph captures beyond plain sampling: top-k / top-p searches, the min-p pass, top logprobs
    (a power of two, or 0) and penalties. Bans are in every mode."""

    filters: bool
    min_p: bool
    num_top: int
    penalties: bool


@dataclass
class GraphInputs:
    """One launch's inputs: a list per INT_FIELDS and FLOAT_FIELDS name (one value per sequence), block tables,
    and for a `mode`: ban pairs (row, token) and, with penalties, each row's prompt and output tokens."""

    ints: list[list[int]]
    floats: list[list[float]]
    tables: list[list[int]]
    mode: Optional[Mode] = None
    bans: list[tuple[int, int]] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)


def batch_sizes(max_batch: int) -> list[int]:
    """The padded sizes captured: 1, 2, 4, 8, then every multiple of 16 up to `max_batch`."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch + 1, 16))
    return sizes if sizes and sizes[-1] == max_batch else sizes + [max_batch]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    out: SamplerOutput
    logits: torch.Tensor


class DecodeGraphs:
    """Captures and replays decode steps of up to `max_batch` sequences."""

    def __init__(self, model: CausalLM, kv_caches: list[torch.Tensor], backend: AttentionBackend,
                 block_size: int, max_batch: int, max_blocks: int):
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.block_size = block_size
        self.max_batch = max_batch
        self.vocab_size = model.config.vocab_size
        device = self.device = kv_caches[0].device
        self.ints = torch.zeros(len(INT_FIELDS), max_batch, dtype=torch.int64, device=device)
        self.host_ints = torch.zeros_like(self.ints, device="cpu").pin_memory()
        self.floats = torch.zeros(len(FLOAT_FIELDS), max_batch, dtype=torch.float32, device=device)
        self.host_floats = torch.zeros_like(self.floats, device="cpu").pin_memory()
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int64, device=device)
        self.host_tables = torch.zeros_like(self.block_tables, device="cpu").pin_memory()
        self.bans = torch.full((2, BANS_PER_ROW * max_batch), -1, dtype=torch.int64, device=device)  # rows, tokens
        self.host_bans = torch.zeros_like(self.bans, device="cpu").pin_memory()
        self.counts: Optional[torch.Tensor] = None  # penalty state [max_batch, V], made for the first penalty mode
        self.prompt_mask: Optional[torch.Tensor] = None
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int64, device=device)
        self.pool = None
        self.graphs: dict[tuple[int, Optional[Mode]], _Graph] = {}
        self.mode: Optional[Mode] = None  # the last launch's, which `resume` continues
        self.routes: Optional[torch.Tensor] = None  # a MoE model's routed-experts recording buffer (set to capture)

    def field(self, name: str) -> torch.Tensor:
        return self.ints[INT_FIELDS.index(name)]

    def float_field(self, name: str) -> torch.Tensor:
        return self.floats[FLOAT_FIELDS.index(name)]

    def capture(self) -> None:
        """Capture every batch size with plain sampling, largest first (smaller ones reuse its memory)."""
        for size in reversed(batch_sizes(self.max_batch)):
            self._ensure(size, None)
        torch.cuda.synchronize()

    def _ensure(self, size: int, mode: Optional[Mode]) -> _Graph:
        """The graph of this size and mode, captured now if it is not yet (over inputs that write nothing)."""
        key = (size, mode)
        if key not in self.graphs:
            if mode is not None and mode.penalties and self.counts is None:
                self.counts = torch.zeros(self.max_batch, self.vocab_size, dtype=torch.int32, device=self.device)
                self.prompt_mask = torch.zeros(self.max_batch, self.vocab_size, dtype=torch.bool, device=self.device)
            self.ints.zero_()
            self.field("slot_mapping").fill_(-1)
            self.floats.copy_(torch.tensor(FLOAT_PADDING)[:, None].expand_as(self.floats))
            self.bans.fill_(-1)
            self.graphs[key] = self._capture(size, mode)
        return self.graphs[key]

    def _capture(self, size: int, mode: Optional[Mode]) -> _Graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step(size, mode)  # compiles the Triton kernels for this shape outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        # our own stream: torch's default capture stream is made once per process, maybe on another device
        with torch.cuda.graph(graph, pool=self.pool, stream=stream):
            out, logits = self._step(size, mode)
        self.pool = graph.pool()
        return _Graph(graph, out, logits)

    @torch.inference_mode()
    def _step(self, size: int, mode: Optional[Mode]) -> tuple[SamplerOutput, torch.Tensor]:
        meta = AttentionMetadata(
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.field("seq_lens")[:size],
            block_tables=self.block_tables[:size],
            slot_mapping=self.field("slot_mapping")[:size],
            max_query_len=1,
            max_seq_len=self.block_tables.shape[1] * self.block_size,
        )
        self._slots(size)
        self.backend.prepare(meta, self.block_size)
        ctx = ForwardContext(self.backend, meta, self.kv_caches)
        hidden = self.model(self.field("input_ids")[:size], self.field("positions")[:size], ctx)
        logits = self.model.compute_logits(hidden)
        t = self._sampling(size, mode)
        out = sample(logits, t)
        if t.penalties is not None:
            record_tokens(t.penalties.output_counts, out.token_ids)
        self._advance(size, out.token_ids)
        return out, logits

    def _sampling(self, size: int, mode: Optional[Mode]) -> SamplingTensors:
        """The sampler's settings of the first `size` rows, views of the static inputs (bans and penalties
        only in a mode)."""
        none = self.field("seeds")[:0]
        t = SamplingTensors(
            temperature=self.float_field("temperature")[:size], top_k=self.field("top_k")[:size],
            top_p=self.float_field("top_p")[:size], min_p=self.float_field("min_p")[:size],
            seeds=self.field("seeds")[:size], steps=self.field("steps")[:size], use_raw=self.field("use_raw")[:size],
            banned_rows=none, banned_cols=none, needs_sort=False, needs_min_p=False, max_top_logprobs=0,
        )
        if mode is None:
            return t
        rows, cols = self.bans
        held = rows.clamp(min=0)
        live = (rows >= 0) & (self.field("steps")[held] < self.field("min_tokens")[held])
        t.banned_rows, t.banned_cols = torch.where(live, rows, -1), cols
        t.needs_sort, t.needs_min_p, t.max_top_logprobs = mode.filters, mode.min_p, mode.num_top
        if mode.penalties:
            t.penalties = PenaltyTensors(self.float_field("repetition")[:size], self.float_field("presence")[:size],
                                         self.float_field("frequency")[:size], self.counts[:size],
                                         self.prompt_mask[:size])
        return t

    def _slots(self, size: int) -> None:
        """Cache slot of each row's token, from its position and block table (-1 on padding rows)."""
        positions = self.field("positions")[:size]
        block = self.block_tables[:size].gather(1, (positions // self.block_size)[:, None])[:, 0]
        slot = block * self.block_size + positions % self.block_size
        self.field("slot_mapping")[:size].copy_(torch.where(self.field("seq_lens")[:size] > 0, slot, -1))

    def _advance(self, size: int, token_ids: torch.Tensor) -> None:
        """Turn the inputs into the next decode step's: the sampled tokens at the next positions."""
        active = (self.field("seq_lens")[:size] > 0).long()
        self.field("input_ids")[:size].copy_(token_ids)
        self.field("positions")[:size].add_(active)
        self.field("seq_lens")[:size].add_(active)
        self.field("steps")[:size].add_(1)

    def size_for(self, num_seqs: int) -> int:
        """The smallest captured size that fits `num_seqs` (which must be <= max_batch)."""
        return next(size for size in batch_sizes(self.max_batch) if size >= num_seqs)

    def fits(self, bans: int) -> bool:
        """Whether `bans` ban pairs fit the static inputs."""
        return bans <= self.bans.shape[1]

    def replay(self, inputs: GraphInputs, num_steps: int = 1,
               routes: Optional[list[torch.Tensor]] = None) -> tuple[SamplerOutput, torch.Tensor]:
        """Run `num_steps` decode steps for the sequences of `inputs`, each step feeding the next.

        The block tables hold blocks for every step. Returns the sampler outputs stacked [num_steps, B] (top
        logprobs [num_steps, B, K]) and the last step's logits; with `routes` (a list), each step's routed
        experts [B, MoE layers, top_k] are appended to it (device copies).
        """
        num = len(inputs.tables)
        size = self.size_for(num)
        self._ensure(size, inputs.mode)
        self._load(inputs, size)
        self.mode = inputs.mode
        return self._replay(num, size, num_steps, routes)

    def resume(self, tables: list[list[int]], num_steps: int,
               routes: Optional[list[torch.Tensor]] = None) -> tuple[SamplerOutput, torch.Tensor]:
        """Run `num_steps` more steps of the last batch from where its last step left the inputs, with the
        sequences' block tables (grown for the new steps). Queued behind the earlier steps, not waiting for them."""
        num = len(tables)
        width = max(len(t) for t in tables)
        rows = torch.tensor([t + [0] * (width - len(t)) for t in tables]).pin_memory()  # freed after the copy ran
        self.block_tables[:num, :width].copy_(rows, non_blocking=True)
        return self._replay(num, self.size_for(num), num_steps, routes)

    def _replay(self, num: int, size: int, num_steps: int,
                routes: Optional[list[torch.Tensor]]) -> tuple[SamplerOutput, torch.Tensor]:
        entry = self.graphs[(size, self.mode)]
        steps = []
        for _ in range(num_steps):
            entry.graph.replay()
            out = entry.out
            steps.append([x[:num].clone() for x in (out.token_ids, out.logprobs, out.top_ids, out.top_logprobs)])
            if routes is not None:
                routes.append(self.routes[:num].clone())
        out = SamplerOutput(*(torch.stack(xs) for xs in zip(*steps)))
        return out, entry.logits[:num]

    def _load(self, inputs: GraphInputs, size: int) -> None:
        num = len(inputs.tables)
        width = max(len(t) for t in inputs.tables)
        self.host_ints[:, :num] = torch.tensor(inputs.ints, dtype=torch.int64)
        self.host_ints[:, num:size] = 0
        self.host_ints[INT_FIELDS.index("slot_mapping"), num:size] = -1
        self.host_floats[:, :num] = torch.tensor(inputs.floats, dtype=torch.float32)
        self.host_floats[:, num:size] = torch.tensor(FLOAT_PADDING)[:, None]
        self.host_tables[:num, :width] = torch.tensor([t + [0] * (width - len(t)) for t in inputs.tables])
        self.ints[:, :size].copy_(self.host_ints[:, :size], non_blocking=True)
        self.floats[:, :size].copy_(self.host_floats[:, :size], non_blocking=True)
        self.block_tables[:num, :width].copy_(self.host_tables[:num, :width], non_blocking=True)
        if inputs.mode is not None:
            self.host_bans.fill_(-1)
            if inputs.bans:
                self.host_bans[:, : len(inputs.bans)] = torch.tensor(inputs.bans, dtype=torch.int64).T
            self.bans.copy_(self.host_bans, non_blocking=True)
        if inputs.mode is not None and inputs.mode.penalties:
            fill_penalty_state(self.counts, self.prompt_mask, inputs.prompts, inputs.outputs)
