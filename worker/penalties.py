"""Repetition, presence and frequency penalties: per-row state as plain device tensors, applied as vLLM does.

Before temperature (and before any filter), for each row:
* repetition r: a token seen in the prompt or the output so far has its logit divided by r
  when positive, multiplied by r otherwise (r = 1 is off);
* frequency f and presence p: logit -= f * (times the token occurs in the output) + p * (it occurs at all)
  (f = p = 0 is off).
Raw logprobs stay those of the model's logits; processed ones are of the penalized distribution.

The model runner keeps, per sequence slot, the output token counts and the prompt's token mask (dense
[S, V] rows, so that a decode step inside a CUDA graph updates them with `record_tokens`, a static-shape
scatter), and passes them with the per-row settings as a `PenaltyTensors` in `SamplingTensors.penalties`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class PenaltyTensors:
    """Penalty settings and state of S rows over a vocabulary of V (all on the logits' device)."""

    repetition: torch.Tensor  # float32 [S]; > 0, 1 = off
    presence: torch.Tensor  # float32 [S]; 0 = off
    frequency: torch.Tensor  # float32 [S]; 0 = off
    output_counts: torch.Tensor  # int32 [S, V], contiguous: occurrences of each token in the row's output so far
    prompt_mask: torch.Tensor  # bool [S, V], contiguous: the token occurs in the row's prompt

    def check(self, rows: int, vocab: int) -> None:
        """Raise ValueError unless the shapes and dtypes fit logits [rows, vocab]."""
        expected = {"repetition": ((rows,), torch.float32), "presence": ((rows,), torch.float32),
                    "frequency": ((rows,), torch.float32), "output_counts": ((rows, vocab), torch.int32),
                    "prompt_mask": ((rows, vocab), torch.bool)}
        for name, (shape, dtype) in expected.items():
            value = getattr(self, name)
            if tuple(value.shape) != shape or value.dtype != dtype or not value.is_contiguous():
                raise ValueError(f"PenaltyTensors.{name} must be a contiguous {dtype} tensor of shape {shape}, got "
                                 f"{value.dtype} {tuple(value.shape)}")


def fill_penalty_state(output_counts: torch.Tensor, prompt_mask: torch.Tensor, prompts: Sequence[Sequence[int]],
                       outputs: Sequence[Sequence[int]]) -> None:
    """Set rows 0..len(prompts)-1 of the device state from token lists: one copy of the token ids to the device
    and two scatters (no host sync); the rows' earlier contents are cleared."""
    rows = len(prompts)
    output_counts[:rows].zero_()
    prompt_mask[:rows].zero_()
    index = [[r, tok] for r, prompt in enumerate(prompts) for tok in prompt]
    split = len(index)
    index += [[r, tok] for r, output in enumerate(outputs) for tok in output]
    if not index:
        return
    pairs = torch.tensor(index, dtype=torch.int64).to(output_counts.device, non_blocking=True)
    prompt_mask.index_put_((pairs[:split, 0], pairs[:split, 1]),
                           torch.ones(split, dtype=torch.bool, device=prompt_mask.device))
    ones = torch.ones(len(index) - split, dtype=output_counts.dtype, device=output_counts.device)
    output_counts.index_put_((pairs[split:, 0], pairs[split:, 1]), ones, accumulate=True)


def record_tokens(output_counts: torch.Tensor, token_ids: torch.Tensor) -> None:
    """Count one sampled token per row ([S] int64) into output_counts [S, V] (no host sync, static shapes)."""
    ones = torch.ones(token_ids.shape[0], 1, dtype=output_counts.dtype, device=output_counts.device)
    output_counts.scatter_add_(1, token_ids[:, None], ones)


def apply_penalties(logits: torch.Tensor, p: PenaltyTensors) -> torch.Tensor:
    """Penalized float32 logits [S, V] (the fused kernel computes the same float32 operations)."""
    counts = p.output_counts
    present = counts > 0
    rep = torch.where(p.prompt_mask | present, p.repetition[:, None], 1.0)
    logits = torch.where(logits > 0, logits / rep, logits * rep)
    logits = logits - p.frequency[:, None] * counts.float()
    return logits - p.presence[:, None] * present.float()
