"""The request front every engine shares (checks, ids, seeds), and what a request is inside the engine loop."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Optional

from rollout.core import Continuation
from rollout.errors import InvalidRequestError
from rollout.outputs import PartialSample, RolloutOutput, Sample, SampleDelta
from rollout.sampling_params import SamplingParams
from rollout.sequence import Sequence
from rollout.validation import check_requests


class Sink:
    """Where a request's results go. Called on the engine thread: must not block."""

    stream = False  # whether it wants a SampleDelta per sample per step

    def deltas(self, deltas: list[SampleDelta]) -> None:
        """New tokens of the request's samples (only called when `stream`)."""

    def finished(self, output: RolloutOutput) -> None:
        """Every sample has ended."""

    def failed(self, error: BaseException) -> None:
        """The request was refused or its step failed; nothing more comes."""


@dataclass
class Request:
    """One prompt's request as the engine loop tracks it."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    sink: Sink
    continuation: Optional[Continuation] = None
    wait: bool = True  # while paused or asleep: wait, or be refused
    seqs: list[Sequence] = field(default_factory=list)
    num_running: int = 0  # samples not ended yet


class RequestFront:
    """Checks prompts and sampling params, and gives requests their ids and seeds (thread-safe).

    Every frontend (synchronous, asyncio, Ray) goes through one, so limits and
    messages are the same everywhere; a request's seed is its params' or one drawn
    from the engine's seed. `routed_experts`: (MoE layers, top_k, num_experts) of a
    mixture-of-experts model (see `routed_experts_shape`), None for a dense one.
    """

    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, seed: int,
                 routed_experts: Optional[tuple[int, int, int]] = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.routed_experts = routed_experts
        self._rng = random.Random(seed)
        self._next_id = 0
        self._lock = threading.Lock()

    def check(self, prompts, sampling_params, labels: Optional[list[str]] = None):
        """(token-id prompts, one SamplingParams per prompt), or InvalidRequestError naming what is wrong."""
        prompts, params = check_requests(prompts, sampling_params, self.tokenizer, self.vocab_size,
                                         self.max_model_len, labels)
        if self.routed_experts is None and any(p.return_routed_experts for p in params):
            raise InvalidRequestError("return_routed_experts=True needs a mixture-of-experts model (Qwen3MoeForCausalLM"
                                      ", Qwen2MoeForCausalLM); this checkpoint's model is dense: it routes no "
                                      "tokens to experts")
        return prompts, params

    def seed(self, params: SamplingParams) -> int:
        if params.seed is not None:
            return params.seed
        with self._lock:
            return self._rng.getrandbits(63)

    def new_id(self) -> str:
        with self._lock:
            self._next_id += 1
            return str(self._next_id - 1)

    def request(self, prompt: list[int], params: SamplingParams, sink: Sink, request_id: Optional[str] = None,
                partial: Optional[PartialSample] = None) -> Request:
        """A checked request (prompt already checked by `check`); `partial` continues an earlier sample."""
        if request_id is not None and (not isinstance(request_id, str) or not request_id):
            raise InvalidRequestError(f"request_id must be a non-empty string, got {request_id!r}")
        continuation = None if partial is None else self.continuation(prompt, params, partial)
        return Request(request_id or self.new_id(), prompt, params, self.seed(params), sink, continuation)

    def continuation(self, prompt: list[int], params: SamplingParams, partial) -> Continuation:
        """The checked `Continuation` of a partial sample, or InvalidRequestError."""
        if not isinstance(partial, PartialSample):
            partial = PartialSample.model_validate(partial)
        tokens = partial.token_ids
        if params.n != 1:
            raise InvalidRequestError(f"a continued sample is one sample: n must be 1, got {params.n} (continue "
                                      f"each sample of a request separately, with its `index`)")
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"partial token ids must be in [0, {self.vocab_size}); got {bad[:5]}")
        if len(prompt) + len(tokens) >= self.max_model_len:
            raise InvalidRequestError(f"prompt ({len(prompt)}) + partial sample ({len(tokens)}) tokens leave no "
                                      f"room under max_model_len={self.max_model_len}")
        versions = partial.token_weight_versions or [-1] * len(tokens)
        lists = {"logprobs": partial.logprobs, "top_logprobs": partial.top_logprobs,
                 "token_weight_versions": versions}
        for name, values in lists.items():
            if values is not None and len(values) != len(tokens):
                raise InvalidRequestError(f"partial {name} has {len(values)} entries for {len(tokens)} tokens")
        if params.logprobs and partial.logprobs is None:
            raise InvalidRequestError("logprobs=True: the partial sample must carry the logprobs of its tokens")
        if params.top_logprobs and partial.top_logprobs is None:
            raise InvalidRequestError("top_logprobs > 0: the partial sample must carry its top_logprobs")
        routes = partial.routed_experts if params.return_routed_experts else None
        if routes is not None:
            self._check_routes(routes, len(prompt) + len(tokens) - 1 if tokens else 0)
        return Continuation(list(tokens), list(partial.logprobs or []) if params.logprobs else [],
                            list(partial.top_logprobs or []) if params.top_logprobs else [], list(versions),
                            partial.index, routes)

    def _check_routes(self, routes, rows: int) -> None:
        layers, top_k, experts = self.routed_experts
        if tuple(routes.shape) != (rows, layers, top_k):
            raise InvalidRequestError(f"partial routed_experts must be [prompt + token_ids[:-1] = {rows}, {layers}, "
                                      f"{top_k}] (a Sample's routed_experts), got {list(routes.shape)}")
        if routes.size and routes.max() >= experts:
            raise InvalidRequestError(f"partial routed_experts holds expert ids outside 0..{experts - 1}")


def sample_delta(seq: Sequence, start: int) -> SampleDelta:
    """A sample's outputs from index `start` on (built on the engine thread: the lists are copied)."""
    p, begin = seq.params, seq.prompt_len + start
    return SampleDelta.model_construct(
        request_id=seq.request_id, index=seq.index, token_ids=seq.token_ids[begin:],
        logprobs=seq.logprobs[start:] if p.logprobs else None,
        top_logprobs=seq.top_logprobs[start:] if p.top_logprobs else None,
        weight_versions=seq.weight_versions[start:], finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
        routed_experts=None if seq.routes is None else seq.routes.span(seq.prompt_len, start, seq.num_output))


def rollout_output(request: Request, tokenizer, serving_version: int) -> RolloutOutput:
    """The request's finished samples, in sample order."""
    scores = next((seq.scores for seq in request.seqs if seq.scores is not None), None)
    return RolloutOutput(request_id=request.request_id, prompt_token_ids=request.prompt,
                         samples=[_sample(seq, tokenizer, serving_version) for seq in request.seqs],
                         prompt_logprobs=None if scores is None else scores.logprobs[: scores.num_scored],
                         prompt_top_logprobs=scores.top_logprobs[: scores.num_scored]
                         if scores is not None and scores.top else None)


def _sample(seq: Sequence, tokenizer, serving_version: int) -> Sample:
    text = seq.text
    if text is None and tokenizer is not None:
        text = tokenizer.decode(seq.output_ids, skip_special_tokens=True)
    versions = seq.weight_versions
    return Sample(
        token_ids=seq.output_ids,
        logprobs=seq.logprobs if seq.params.logprobs else None,
        top_logprobs=seq.top_logprobs if seq.params.top_logprobs else None,
        finish_reason=seq.finish_reason,
        stop_reason=seq.stop_reason,
        weight_version=versions[0] if versions else serving_version,
        token_weight_versions=versions,
        text=text,
        routed_experts=None if seq.routes is None else seq.routes.span(seq.prompt_len, 0, seq.num_output),
    )
