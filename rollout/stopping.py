"""When a sample ends: the stop rules, in one place, for one token or a decode round of several."""

from __future__ import annotations

from typing import Optional, Sequence as Seq

from rollout.sampling_params import SamplingParams
from rollout.sequence import Sequence


class StopRules:
    """Appends sampled tokens to a sequence up to the first that ends it, and records why.

    In order, for each new token: a stop token id (`stop_token_ids`, or the model's
    end-of-sequence ids unless `ignore_eos`) or a stop string ends the sample with
    "stop", once `min_tokens` are out; reaching `max_tokens` (the sample's
    `max_output`) or `max_model_len` ends it with "length".
    """

    def __init__(self, eos_token_ids: set[int], max_model_len: int, tokenizer=None):
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer

    def stop_ids(self, p: SamplingParams) -> set[int]:
        """Token ids that end a sample with these params (banned by the sampler until min_tokens are out)."""
        return set(p.stop_token_ids) if p.ignore_eos else set(p.stop_token_ids) | self.eos_token_ids

    def take(self, seq: Sequence, tokens: Seq[int], logprobs: Seq[float], top: Seq[list[tuple[int, float]]],
             version: int) -> int:
        """Append `tokens` (consecutive samples of `seq`) up to the first that ends it; returns how many were
        taken. Each taken token is stamped with the weight `version` that produced it."""
        p = seq.params
        room = min(seq.max_output - seq.num_output, self.max_model_len - seq.num_tokens)
        if room <= 0:  # e.g. max_tokens=0 (prompt scoring): the step's token is not the sample's
            seq.finish_reason = "length"
            return 0
        if p.stop:  # stop strings: decode after every token
            for taken in range(1, len(tokens) + 1):
                self._extend(seq, tokens, logprobs, top, taken - 1, taken, version)
                if self._ends(seq):
                    return taken
            return len(tokens)
        take = min(len(tokens), room)
        stops = self.stop_ids(p)
        first = max(0, p.min_tokens - seq.num_output - 1)  # stop tokens count once min_tokens are out
        hit = next((i for i in range(first, take) if tokens[i] in stops), None)
        if hit is not None:
            take = hit + 1
            seq.finish_reason = "stop"
            seq.stop_reason = tokens[hit] if tokens[hit] in p.stop_token_ids else None
        elif take == room:
            seq.finish_reason = "length"
        self._extend(seq, tokens, logprobs, top, 0, take, version)
        return take

    @staticmethod
    def _extend(seq: Sequence, tokens, logprobs, top, start: int, end: int, version: int) -> None:
        seq.token_ids.extend(tokens[start:end])
        seq.weight_versions.extend([version] * (end - start))
        if seq.params.logprobs:
            seq.logprobs.extend(logprobs[start:end])
        if seq.params.top_logprobs:
            seq.top_logprobs.extend(dict(t) for t in top[start:end])

    def _ends(self, seq: Sequence) -> bool:
        """Token-by-token check of the last token (the path with stop strings); records the reason."""
        p, token = seq.params, seq.token_ids[-1]
        reason: tuple[Optional[str], Optional[int | str]] = (None, None)
        if seq.num_output >= p.min_tokens:
            if token in p.stop_token_ids:
                reason = ("stop", token)
            elif not p.ignore_eos and token in self.eos_token_ids:
                reason = ("stop", None)
            elif self._find_stop_string(seq):
                reason = ("stop", seq.stop_reason)
        if reason[0] is None and (seq.num_output >= seq.max_output or seq.num_tokens >= self.max_model_len):
            reason = ("length", None)
        if reason[0] is not None:
            seq.finish_reason, seq.stop_reason = reason
        return reason[0] is not None

    def _find_stop_string(self, seq: Sequence) -> bool:
        """Decode the output; on a stop string, keep the text before it and record which one."""
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        found = [(text.find(s), s) for s in seq.params.stop if s in text]
        if not found:
            return False
        index, stop = min(found)
        seq.text, seq.stop_reason = text[:index], stop
        return True
