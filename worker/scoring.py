"""Prompt scoring: the raw logprob of given next tokens and the most likely tokens, from the model's hidden states.

The LM head and the log-softmax run over blocks of rows, so that at most ROW_ELEMENTS float32 logits (and their
log-softmax) exist at once, whatever the prompt's length: a 32k-token prompt never makes a [tokens x vocab]
tensor. On CUDA without top logprobs (the common case: recomputing a rollout's logprobs) a Triton kernel reads each
block of logits once in its dtype (`worker.kernels.sampling.token_logprobs`) instead of a float32 log-softmax.
"""

from __future__ import annotations

import torch

from worker import kernels

ROW_ELEMENTS = 1 << 26  # float32 logits per block of rows: 256 MiB (441 rows of a 151,936-token vocabulary)


def score_rows(compute_logits, hidden: torch.Tensor, targets: torch.Tensor,
               top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each row of `hidden` [M, H]: log_softmax(logits)[target] ([M] float32, `targets` [M] int64) and the
    `top` largest logprobs with their token ids ([M, top], ties by token id). `compute_logits` maps hidden rows
    to logits [rows, V] (the model's LM head)."""
    rows = hidden.shape[0]
    logprobs = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    top_ids = torch.empty(rows, top, dtype=torch.int64, device=hidden.device)
    top_values = torch.empty(rows, top, dtype=torch.float32, device=hidden.device)
    step = None
    start = 0
    while start < rows:
        logits = compute_logits(hidden[start : start + (step or 1)])
        if step is None:  # the first block (one row) tells the vocabulary size
            step = max(1, ROW_ELEMENTS // logits.shape[1])
        end = start + logits.shape[0]
        if not top and kernels.use_for(logits):  # one read of the logits in their dtype
            from worker.kernels.sampling import token_logprobs

            logprobs[start:end] = token_logprobs(logits, targets[start:end])
        else:
            scores = torch.log_softmax(logits.float(), dim=-1)
            del logits
            logprobs[start:end] = scores.gather(1, targets[start:end, None])[:, 0]
            if top:
                top_values[start:end], top_ids[start:end] = _topk(scores, top)
        start = end
    return logprobs, top_ids, top_values


def _topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest per row ([rows, k] values and ids), ties by token id: every token above the k-th value, then
    the smallest ids at it."""
    threshold = scores.topk(k, dim=-1).values[:, -1:]
    above = scores > threshold
    at = scores == threshold
    room = k - above.sum(dim=-1, keepdim=True, dtype=torch.int32)
    keep = above | (at & (torch.cumsum(at, dim=-1, dtype=torch.int32) <= room))
    ids = keep.nonzero()[:, 1].view(scores.shape[0], k)  # ascending ids per row
    values = scores.gather(1, ids)
    order = values.argsort(dim=-1, descending=True, stable=True)
    return values.gather(1, order), ids.gather(1, order)
