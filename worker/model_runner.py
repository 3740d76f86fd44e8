"""Turns a Batch into tensors, runs the model over the paged cache, samples on the device."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from worker.attention import AttentionBackend, AttentionMetadata
from worker.cuda_graphs import DecodeGraphs, GraphInputs, Mode
from worker.models.llama import CausalLM, ForwardContext
from worker.penalties import PenaltyTensors, fill_penalty_state
from worker.sampler import SamplerOutput, SamplingTensors, sample
from worker.scoring import score_rows
from worker.steps import Batch, Round, SamplingInfo, SeqChunk, StepOutput


class ModelRunner:
    """Executes steps for one model and one KV cache on one device."""

    def __init__(self, model: CausalLM, kv_caches: list[torch.Tensor], backend: AttentionBackend, block_size: int):
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.block_size = block_size
        self.vocab_size = model.config.vocab_size
        self.device = kv_caches[0].device
        self.graphs: Optional[DecodeGraphs] = None
        self.moe = bool(model.moe_blocks())
        self.routes: Optional[torch.Tensor] = None  # the MoE model's routed-experts recording buffer, once needed

    def capture_graphs(self, max_batch: int, max_blocks: int) -> None:
        """Capture CUDA graphs of decode steps up to `max_batch` sequences (CUDA with the Triton backend); a MoE
        model's graphs record routed experts into a buffer of their own."""
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.backend, self.block_size, max_batch, max_blocks)
        if self.moe:
            self.graphs.routes = self._recording(max_batch)
        self.graphs.capture()

    @torch.inference_mode()
    def launch(self, batch: Batch) -> Round:
        """Start the batch's step(s) (decode rounds run several, each step's tokens feeding the next)."""
        chunks = batch.chunks
        if self.graphs is not None and len(chunks) <= self.graphs.max_batch and all(
                len(c.token_ids) == 1 and c.sampling is not None and not c.score_targets for c in chunks):
            infos = [c.sampling for c in chunks]
            if self.graphs.fits(sum(len(i.banned_token_ids) for i in infos)):
                return self._launch_graph(chunks, infos, batch.num_steps, batch.routed_experts)
        return self._run_eager(chunks, batch.num_steps, batch.routed_experts)

    @torch.inference_mode()
    def resume(self, previous: Round, num_steps: int, tables: list[list[int]]) -> Round:
        """Run `num_steps` more decode steps of a round's sequences, queued behind it; `tables` are their block
        tables, grown for the new steps."""
        if previous.advanced_on_device:
            routes = [] if previous.with_routes else None
            out, _ = self.graphs.resume(tables, num_steps, routes)
            return Round.started(out, num_steps, None if routes is None else torch.stack(routes),
                                 previous.top_counts)
        last = previous.outputs()[-1].token_ids
        chunks = [replace(_advance(c, token), block_table=table)
                  for c, token, table in zip(previous.chunks, last, tables)]
        return self._run_eager(chunks, num_steps, previous.with_routes)

    def _run_eager(self, chunks: list[SeqChunk], num_steps: int, routes: bool) -> Round:
        outputs = [self._execute_eager(chunks, routes)]
        for _ in range(num_steps - 1):
            chunks = [_advance(c, token) for c, token in zip(chunks, outputs[-1].token_ids)]
            outputs.append(self._execute_eager(chunks, routes))
        return Round(num_steps, chunks=chunks, ready=outputs, with_routes=routes)

    def _execute_eager(self, chunks: list[SeqChunk], routes: bool = False) -> StepOutput:
        input_ids, positions, meta, logits_rows = self._prepare(chunks)
        if routes or self.routes is not None:  # once recording, every forward needs its rows
            self._recording(len(input_ids))
        self.backend.prepare(meta, self.block_size)
        hidden = self.model(input_ids, positions, ForwardContext(self.backend, meta, self.kv_caches))
        infos = [c.sampling for c in chunks if c.sampling is not None]
        out = StepOutput([], [], [])
        if infos:
            logits = self.model.compute_logits(hidden[logits_rows])
            out = _to_step_output(sample(logits, self._sampling_tensors(infos)), infos)
        if any(c.score_targets for c in chunks):
            out.prompt_logprobs = self._score(chunks, hidden)
        if routes:  # after the sampler's copy: one wait for the device
            out.routed_experts = self.routes[: len(input_ids)].to("cpu", copy=True).numpy()
        return out

    def _score(self, chunks: list[SeqChunk], hidden: torch.Tensor) -> dict:
        """Prompt scores of the chunks with `score_targets` (their first rows), copied to the host."""
        rows, targets, spans, start = [], [], {}, 0
        for index, chunk in enumerate(chunks):
            if chunk.score_targets:
                spans[index] = (len(rows), len(chunk.score_targets), chunk.score_top)
                rows.extend(range(start, start + len(chunk.score_targets)))
                targets.extend(chunk.score_targets)
            start += len(chunk.token_ids)
        top = max(k for _, _, k in spans.values())
        logprobs, ids, values = score_rows(self.model.compute_logits, hidden[self._tensor(rows)],
                                           self._tensor(targets), top)
        logprobs, ids, values = logprobs.tolist(), ids.tolist(), values.tolist()
        return {index: (logprobs[r : r + n], [list(zip(ids[i][:k], values[i][:k])) for i in range(r, r + n)])
                for index, (r, n, k) in spans.items()}

    def _recording(self, num_tokens: int) -> torch.Tensor:
        """The routed-experts recording buffer, grown to `num_tokens` rows (the model writes every forward's
        routings into it from then on; CUDA graphs keep the buffer they were captured with)."""
        if self.routes is None or self.routes.shape[0] < num_tokens:
            blocks = self.model.moe_blocks()
            rows = max(num_tokens, 2 * self.routes.shape[0] if self.routes is not None else 0)
            self.routes = torch.zeros(rows, len(blocks), blocks[0].top_k, dtype=torch.int16, device=self.device)
            self.model.record_routed_experts(self.routes)
        return self.routes

    def _launch_graph(self, chunks: list[SeqChunk], infos: list[SamplingInfo], num_steps: int,
                      with_routes: bool) -> Round:
        bs = self.block_size
        ints = [
            [c.token_ids[0] for c in chunks],
            [c.start_pos for c in chunks],
            [c.block_table[c.start_pos // bs] * bs + c.start_pos % bs for c in chunks],
            [c.start_pos + 1 for c in chunks],
            [i.seed for i in infos],
            [i.step for i in infos],
            [int(i.logprobs_mode == "raw") for i in infos],
            [self._top_k(i) for i in infos],
            [i.min_tokens for i in infos],
        ]
        floats = [[i.temperature for i in infos], [self._top_p(i) for i in infos], [i.min_p for i in infos]]
        floats += [[getattr(i.penalties, name, default) for i in infos]
                   for name, default in (("repetition", 1.0), ("presence", 0.0), ("frequency", 0.0))]
        inputs = GraphInputs(ints, floats, [c.block_table for c in chunks], _mode(infos, self.vocab_size))
        if inputs.mode is not None:
            inputs.bans = [(r, tok) for r, i in enumerate(infos) for tok in i.banned_token_ids]
            inputs.prompts = [i.penalties.prompt_ids if i.penalties else [] for i in infos]
            inputs.outputs = [i.penalties.output_ids if i.penalties else [] for i in infos]
        routes = [] if with_routes else None
        out, _ = self.graphs.replay(inputs, num_steps, routes)
        return Round.started(out, num_steps, None if routes is None else torch.stack(routes),
                             [i.top_logprobs for i in infos])

    def _prepare(self, chunks: list[SeqChunk]):
        tokens, positions, slots, starts, seq_lens, rows = [], [], [], [0], [], []
        bs = self.block_size
        for chunk in chunks:
            n = len(chunk.token_ids)
            pos = range(chunk.start_pos, chunk.start_pos + n)
            tokens.extend(chunk.token_ids)
            positions.extend(pos)
            slots.extend(chunk.block_table[p // bs] * bs + p % bs for p in pos)
            starts.append(starts[-1] + n)
            seq_lens.append(chunk.start_pos + n)
            if chunk.sampling is not None:
                rows.append(starts[-1] - 1)
        width = max(len(c.block_table) for c in chunks)
        tables = [c.block_table + [0] * (width - len(c.block_table)) for c in chunks]
        meta = AttentionMetadata(
            query_start_loc=self._tensor(starts),
            seq_lens=self._tensor(seq_lens),
            block_tables=self._tensor(tables),
            slot_mapping=self._tensor(slots),
            max_query_len=max(starts[i + 1] - starts[i] for i in range(len(seq_lens))),
            max_seq_len=max(seq_lens),
        )
        return self._tensor(tokens), self._tensor(positions), meta, self._tensor(rows)

    def _tensor(self, values, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def _top_k(self, info: SamplingInfo) -> int:
        return info.top_k if 0 < info.top_k < self.vocab_size else self.vocab_size

    @staticmethod
    def _top_p(info: SamplingInfo) -> float:
        return info.top_p if info.top_p < 1.0 else 2.0

    def _sampling_tensors(self, infos: list[SamplingInfo]) -> SamplingTensors:
        banned = [(r, tok) for r, i in enumerate(infos) if i.step < i.min_tokens for tok in i.banned_token_ids]
        f32 = torch.float32
        return SamplingTensors(
            temperature=self._tensor([i.temperature for i in infos], f32),
            top_k=self._tensor([self._top_k(i) for i in infos]),
            top_p=self._tensor([self._top_p(i) for i in infos], f32),
            min_p=self._tensor([i.min_p for i in infos], f32),
            seeds=self._tensor([i.seed for i in infos]),
            steps=self._tensor([i.step for i in infos]),
            use_raw=self._tensor([i.logprobs_mode == "raw" for i in infos], torch.bool),
            banned_rows=self._tensor([r for r, _ in banned]),
            banned_cols=self._tensor([t for _, t in banned]),
            needs_sort=any(0 < i.top_k < self.vocab_size or i.top_p < 1.0 for i in infos),
            needs_min_p=any(i.min_p > 0 for i in infos),
            max_top_logprobs=max(i.top_logprobs for i in infos),
            penalties=self._penalties(infos) if any(i.penalties for i in infos) else None,
        )

    def _penalties(self, infos: list[SamplingInfo]) -> PenaltyTensors:
        """The rows' penalty settings and state, built on the device from their token lists."""
        rows, f32 = len(infos), torch.float32
        state = PenaltyTensors(
            *(self._tensor([getattr(i.penalties, name, default) for i in infos], f32)
              for name, default in (("repetition", 1.0), ("presence", 0.0), ("frequency", 0.0))),
            output_counts=torch.empty(rows, self.vocab_size, dtype=torch.int32, device=self.device),
            prompt_mask=torch.empty(rows, self.vocab_size, dtype=torch.bool, device=self.device))
        fill_penalty_state(state.output_counts, state.prompt_mask,
                           [i.penalties.prompt_ids if i.penalties else [] for i in infos],
                           [i.penalties.output_ids if i.penalties else [] for i in infos])
        return state


def _mode(infos: list[SamplingInfo], vocab_size: int) -> Optional[Mode]:
    """The graph mode that samples these rows; None when plain sampling does (no filters, bans, penalties or top
    logprobs). Top logprobs round up to a power of two (fewer graphs)."""
    filters = any(0 < i.top_k < vocab_size or i.top_p < 1.0 for i in infos)
    min_p = any(i.min_p > 0 for i in infos)
    top = max(i.top_logprobs for i in infos)
    penalties = any(i.penalties is not None for i in infos)
    if not (filters or min_p or top or penalties or any(i.banned_token_ids for i in infos)):
        return None
    return Mode(filters, min_p, 1 << (top - 1).bit_length() if top else 0, penalties)


def _advance(chunk: SeqChunk, token: int) -> SeqChunk:
    """The chunk of the next decode step: the token just sampled, one position on (counted by the penalties)."""
    info = chunk.sampling
    penalties = info.penalties and replace(info.penalties, output_ids=info.penalties.output_ids + [token])
    return SeqChunk([token], chunk.start_pos + len(chunk.token_ids), chunk.block_table,
                    replace(info, step=info.step + 1, penalties=penalties))


def _to_step_output(out: SamplerOutput, infos: list[SamplingInfo]) -> StepOutput:
    """Copy one step's sampler results to the host (the step's one synchronisation) as Python values."""
    k = out.top_ids.shape[1]
    host = torch.cat([out.token_ids[:, None].double(), out.logprobs[:, None].double(), out.top_ids.double(),
                      out.top_logprobs.double()], dim=1).cpu().tolist()
    top = [[(int(row[2 + j]), row[2 + k + j]) for j in range(info.top_logprobs)] for row, info in zip(host, infos)]
    return StepOutput([int(r[0]) for r in host], [r[1] for r in host], top)
