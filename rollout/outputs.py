"""What the engines return: whole outputs, streamed deltas, and partial samples to continue."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from rollout.sampling_params import Int


class Sample(BaseModel):
    """One completion of a prompt."""

    token_ids: list[int]
    logprobs: Optional[list[float]] = Field(None, description="Logprob of each sampled token, if asked for.")
    top_logprobs: Optional[list[dict[int, float]]] = Field(
        None, description="Per position, the most likely tokens and their logprobs, if asked for."
    )
    finish_reason: Literal["stop", "length", "abort"]
    stop_reason: Optional[int | str] = Field(None, description="The stop token id or stop string that ended it.")
    weight_version: int = Field(
        description="Version of the weights that produced the first token (all of them, unless an update with "
        "pause_mode='keep' landed mid-sample); the serving version for a sample with no tokens."
    )
    token_weight_versions: list[int] = Field(description="Per token, the version of the weights that produced it.")
    text: Optional[str] = Field(None, description="Decoded tokens, when the checkpoint has a tokenizer.")


class RolloutOutput(BaseModel):
    """All completions of one prompt, in sample order."""

    request_id: str
    prompt_token_ids: list[int]
    samples: list[Sample]


class SampleDelta(BaseModel):
    """What one sample produced since the last delta of its request's stream (`generate_stream`).

    Concatenating a sample's deltas gives its `Sample` (token_ids, logprobs,
    top_logprobs, token_weight_versions); its last delta carries `finish_reason`.
    """

    request_id: str
    index: int = Field(description="The sample's position in its request (0 .. n-1).")
    token_ids: list[int]
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[dict[int, float]]] = None
    weight_versions: list[int] = Field(description="Per new token, the version of the weights that produced it.")
    finish_reason: Optional[Literal["stop", "length", "abort"]] = None
    stop_reason: Optional[int | str] = None


class PartialSample(BaseModel):
    """An earlier sample to continue (e.g. one that ended with finish_reason "abort"): its output tokens after the
    prompt, their logprobs / top logprobs (required when the new request asks for them) and weight versions
    (-1, unknown, when not given), and `index`, the sample's position in its original request, which keys its
    random numbers: with the same prompt, seed and weights, the continuation samples what the uninterrupted
    sample would have."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token_ids: list[Int]
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[dict[int, float]]] = None
    token_weight_versions: Optional[list[Int]] = None
    index: Int = Field(0, ge=0)

    @classmethod
    def of(cls, sample: Sample, index: int = 0) -> "PartialSample":
        """The partial sample to continue `sample` (sample `index` of its request)."""
        return cls(token_ids=sample.token_ids, logprobs=sample.logprobs, top_logprobs=sample.top_logprobs,
                   token_weight_versions=sample.token_weight_versions, index=index)
