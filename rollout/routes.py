"""Routed-expert replay: each sample's rows of expert ids, kept on the host as its tokens go through the model.

Row i of a sample is the routing of its token i (prompt first, then output) in the forward that computed that
token's KV: int16 [MoE layers, top_k]. The last output token has no row (no forward fed it), so a sample with
O >= 1 output tokens has prompt + O - 1 rows, the convention of vLLM and SGLang. Rows come from the step that
computed the token, from the prefix-cache block that holds it (blocks keep the rows of the sample that computed
them), or from the earlier sample a continuation was given. The first row written for a position is kept: a
preempted sample recomputes its tokens but keeps the routings its tokens were sampled with.
"""

from __future__ import annotations

import numpy as np


class RoutedRows:
    """A growing int16 array [positions, layers, top_k]; rows 0 .. count - 1 are filled."""

    def __init__(self, layers: int, top_k: int, capacity: int = 64):
        self.data = np.zeros((max(capacity, 1), layers, top_k), dtype=np.int16)
        self.count = 0
        self.given = 0  # leading rows that came with a continued sample (not computed with this KV)

    def put(self, start: int, rows: np.ndarray) -> None:
        """Rows for positions start, start + 1, ...; positions already filled keep their rows."""
        end = start + len(rows)
        if end <= self.count:
            return
        if start > self.count:
            raise RuntimeError(f"routed experts: rows from position {start} arrived with only {self.count} filled")
        if end > len(self.data):
            grown = np.zeros((max(end, 2 * len(self.data)), *self.data.shape[1:]), dtype=np.int16)
            grown[: self.count] = self.data[: self.count]
            self.data = grown
        self.data[self.count : end] = rows[self.count - start :]
        self.count = end

    def give(self, rows: np.ndarray) -> None:
        """Start with an earlier sample's rows (a continuation)."""
        self.put(0, rows)
        self.given = self.count

    def block(self, index: int, block_size: int):
        """A copy of the rows of full block `index` for the prefix cache, or None when this sample did not compute
        all of them."""
        start, end = index * block_size, (index + 1) * block_size
        if start < self.given or end > self.count:
            return None
        return self.data[start:end].copy()

    def span(self, num_prompt: int, since: int, num_output: int) -> np.ndarray:
        """A copy of the rows a sample with `num_output` output tokens has that it did not have with `since`: a
        sample's rows are prompt + output[:-1] (none before its first output token; fewer if it was aborted
        before they were computed)."""
        def end(n: int) -> int:
            return min(num_prompt + n - 1 if n else 0, self.count)

        return self.data[end(since) : end(num_output)].copy()
