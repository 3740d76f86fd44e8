"""Turns a Batch into tensors, runs the model over the paged cache, samples on the device."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from worker.attention import AttentionBackend, AttentionMetadata
from worker.batch import Batch, SamplingInfo, SeqChunk, StepOutput
from worker.cuda_graphs import DecodeGraphs
from worker.models.llama import CausalLM, ForwardContext
from worker.sampler import SamplerOutput, SamplingTensors, sample, torch_sample


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

    def capture_graphs(self, max_batch: int, max_blocks: int) -> None:
        """Capture CUDA graphs of decode steps up to `max_batch` sequences (CUDA with the Triton backend)."""
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.backend, self.block_size, max_batch, max_blocks)
        self.graphs.capture()

    @torch.inference_mode()
    def execute(self, batch: Batch) -> list[StepOutput]:
        """Compute the batch's tokens into the cache and sample for the chunks that ask for it, for each of
        the batch's steps (decode rounds run several, each step's tokens feeding the next)."""
        chunks = batch.chunks
        if self.graphs is not None and len(chunks) <= self.graphs.max_batch and all(
                len(c.token_ids) == 1 and c.sampling is not None for c in chunks):
            infos = [c.sampling for c in chunks]
            if batch.num_steps == 1 or _plain(infos):
                return self._execute_graph(chunks, infos, batch.num_steps)
        outputs = [self._execute_eager(chunks)]
        for _ in range(batch.num_steps - 1):
            chunks = [_advance(c, token) for c, token in zip(chunks, outputs[-1].token_ids)]
            outputs.append(self._execute_eager(chunks))
        return outputs

    def _execute_eager(self, chunks: list[SeqChunk]) -> StepOutput:
        input_ids, positions, meta, logits_rows = self._prepare(chunks)
        self.backend.prepare(meta, self.block_size)
        hidden = self.model(input_ids, positions, ForwardContext(self.backend, meta, self.kv_caches))
        infos = [c.sampling for c in chunks if c.sampling is not None]
        if not infos:
            return StepOutput([], [], [])
        logits = self.model.compute_logits(hidden[logits_rows])
        return _to_step_outputs(sample(logits, self._sampling_tensors(infos)), infos)[0]

    def _execute_graph(self, chunks: list[SeqChunk], infos: list[SamplingInfo], num_steps: int) -> list[StepOutput]:
        bs = self.block_size
        ints = [
            [c.token_ids[0] for c in chunks],
            [c.start_pos for c in chunks],
            [c.block_table[c.start_pos // bs] * bs + c.start_pos % bs for c in chunks],
            [c.start_pos + 1 for c in chunks],
            [i.seed for i in infos],
            [i.step for i in infos],
            [int(i.logprobs_mode == "raw") for i in infos],
        ]
        out, logits = self.graphs.replay(ints, [i.temperature for i in infos], [c.block_table for c in chunks],
                                         num_steps)
        if not _plain(infos):
            single = torch_sample(logits, self._sampling_tensors(infos))
            out = SamplerOutput(single.token_ids[None], single.logprobs[None], single.top_ids[:, None],
                                single.top_logprobs[:, None])
        return _to_step_outputs(out, infos)

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

    def _sampling_tensors(self, infos: list[SamplingInfo]) -> SamplingTensors:
        banned = [(i, tok) for i, info in enumerate(infos) for tok in info.banned_token_ids]
        f32 = torch.float32
        return SamplingTensors(
            temperature=self._tensor([i.temperature for i in infos], f32),
            top_k=self._tensor([i.top_k if i.top_k > 0 else self.vocab_size for i in infos]),
            top_p=self._tensor([i.top_p if i.top_p < 1.0 else 2.0 for i in infos], f32),
            min_p=self._tensor([i.min_p for i in infos], f32),
            seeds=self._tensor([i.seed for i in infos]),
            steps=self._tensor([i.step for i in infos]),
            use_raw=self._tensor([i.logprobs_mode == "raw" for i in infos], torch.bool),
            banned_rows=self._tensor([r for r, _ in banned]),
            banned_cols=self._tensor([t for _, t in banned]),
            needs_sort=any(0 < i.top_k < self.vocab_size or i.top_p < 1.0 for i in infos),
            needs_min_p=any(i.min_p > 0 for i in infos),
            max_top_logprobs=max(i.top_logprobs for i in infos),
        )


def _plain(infos: list[SamplingInfo]) -> bool:
    """No row uses top-k, top-p, min-p, banned tokens or top logprobs (the in-graph fused sampler suffices)."""
    return not any(0 < i.top_k or i.top_p < 1.0 or i.min_p > 0 or i.banned_token_ids or i.top_logprobs
                   for i in infos)


def _advance(chunk: SeqChunk, token: int) -> SeqChunk:
    """The chunk of the next decode step: the token just sampled, one position on."""
    return SeqChunk([token], chunk.start_pos + len(chunk.token_ids), chunk.block_table,
                    replace(chunk.sampling, step=chunk.sampling.step + 1))


def _to_step_outputs(out: SamplerOutput, infos: list[SamplingInfo]) -> list[StepOutput]:
    """Copy the sampler's results to the host (the step's one synchronisation) as Python values.

    `out` holds one step ([S] tokens) or several stacked ([K, S] tokens, [S, K, k] top logprobs).
    """
    tokens = out.token_ids if out.token_ids.dim() == 2 else out.token_ids[None]
    logprobs = out.logprobs if out.logprobs.dim() == 2 else out.logprobs[None]
    top_ids = out.top_ids if out.top_ids.dim() == 3 else out.top_ids[:, None]
    top_lps = out.top_logprobs if out.top_logprobs.dim() == 3 else out.top_logprobs[:, None]
    steps, rows = tokens.shape
    k = top_ids.shape[2]
    host = torch.cat([tokens.T.double(), logprobs.T.double(), top_ids.reshape(rows, -1).double(),
                      top_lps.reshape(rows, -1).double()], dim=1).cpu().tolist()
    outputs = []
    for step in range(steps):
        top = [[(int(row[2 * steps + (step * k + j)]), row[2 * steps + steps * k + step * k + j])
                for j in range(info.top_logprobs)] for row, info in zip(host, infos)]
        outputs.append(StepOutput([int(r[step]) for r in host], [r[steps + step] for r in host], top))
    return outputs
