"""Decode steps replayed from CUDA graphs, one per padded batch size.

A graph covers the whole step after the inputs are on the device: the cache
slots from positions and block tables, embedding,
every layer (Triton attention included), the final norm, the LM head and the
sampler. Inputs live in static device buffers, filled by two copies from pinned
host memory; padding rows have seq_len 0 and slot -1, so they read nothing and
write nothing. The graphs hold the addresses of the weights and the KV cache,
which sleep / wake keep (the memory pool maps them back in place), and of their
own activations, kept in one private memory pool shared by all sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from worker.attention import AttentionBackend, AttentionMetadata
from worker.models.llama import CausalLM, ForwardContext
from worker.sampler import SamplerOutput, SamplingTensors, sample

INT_FIELDS = ("input_ids", "positions", "slot_mapping", "seq_lens", "seeds", "steps", "use_raw")


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
        device = kv_caches[0].device
        self.ints = torch.zeros(len(INT_FIELDS), max_batch, dtype=torch.int64, device=device)
        self.host_ints = torch.zeros_like(self.ints, device="cpu").pin_memory()
        self.floats = torch.zeros(max_batch, dtype=torch.float32, device=device)  # temperature
        self.host_floats = torch.zeros_like(self.floats, device="cpu").pin_memory()
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int64, device=device)
        self.host_tables = torch.zeros_like(self.block_tables, device="cpu").pin_memory()
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int64, device=device)
        self.pool = None
        self.graphs: dict[int, _Graph] = {}
        self.routes: Optional[torch.Tensor] = None  # a MoE model's routed-experts recording buffer (set to capture)

    def field(self, name: str) -> torch.Tensor:
        return self.ints[INT_FIELDS.index(name)]

    def capture(self) -> None:
        """Capture every batch size, largest first (smaller ones reuse its memory)."""
        self.field("slot_mapping").fill_(-1)
        for size in reversed(batch_sizes(self.max_batch)):
            self.graphs[size] = self._capture(size)
        torch.cuda.synchronize()

    def _capture(self, size: int) -> _Graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step(size)  # compiles the Triton kernels for this shape outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        # our own stream: torch's default capture stream is made once per process, maybe on another device
        with torch.cuda.graph(graph, pool=self.pool, stream=stream):
            out, logits = self._step(size)
        self.pool = graph.pool()
        return _Graph(graph, out, logits)

    @torch.inference_mode()
    def _step(self, size: int) -> tuple[SamplerOutput, torch.Tensor]:
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
        none = self.field("seeds")[:0]
        plain = SamplingTensors(
            temperature=self.floats[:size], top_k=none, top_p=self.floats[:0], min_p=self.floats[:0],
            seeds=self.field("seeds")[:size], steps=self.field("steps")[:size], use_raw=self.field("use_raw")[:size],
            banned_rows=none, banned_cols=none, needs_sort=False, needs_min_p=False, max_top_logprobs=0,
        )
        out = sample(logits, plain)
        self._advance(size, out.token_ids)
        return out, logits

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
        return next(size for size in sorted(self.graphs) if size >= num_seqs)

    def replay(self, ints: list[list[int]], temperature: list[float], tables: list[list[int]],
               num_steps: int = 1, routes: Optional[list[torch.Tensor]] = None) -> tuple[SamplerOutput, torch.Tensor]:
        """Run `num_steps` decode steps for len(temperature) sequences, each step feeding the next.

        `ints` holds one list per name in INT_FIELDS; `tables` the block table of each sequence (with blocks
        for every step). Returns the sampler outputs stacked [num_steps, B] and the last step's logits; with
        `routes` (a list), each step's routed experts [B, MoE layers, top_k] are appended to it (device copies).
        """
        size = self.size_for(len(temperature))
        self._load(ints, temperature, tables, size)
        return self._replay(len(temperature), size, num_steps, routes)

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
        entry = self.graphs[size]
        tokens, logprobs = [], []
        for _ in range(num_steps):
            entry.graph.replay()
            tokens.append(entry.out.token_ids[:num].clone())
            logprobs.append(entry.out.logprobs[:num].clone())
            if routes is not None:
                routes.append(self.routes[:num].clone())
        empty = entry.out.top_ids[:num, None].expand(num, num_steps, 0)
        out = SamplerOutput(torch.stack(tokens), torch.stack(logprobs), empty, empty.float())
        return out, entry.logits[:num]

    def _load(self, ints: list[list[int]], temperature: list[float], tables: list[list[int]], size: int) -> None:
        num = len(temperature)
        width = max(len(t) for t in tables)
        self.host_ints[:, :num] = torch.tensor(ints, dtype=torch.int64)
        self.host_ints[:, num:size] = 0
        self.host_ints[INT_FIELDS.index("slot_mapping"), num:size] = -1
        self.host_floats[:num] = torch.tensor(temperature, dtype=torch.float32)
        self.host_tables[:num, :width] = torch.tensor([t + [0] * (width - len(t)) for t in tables])
        self.ints[:, :size].copy_(self.host_ints[:, :size], non_blocking=True)
        self.floats[:size].copy_(self.host_floats[:size], non_blocking=True)
        self.block_tables[:num, :width].copy_(self.host_tables[:num, :width], non_blocking=True)
