"""What the engines return: whole outputs, streamed deltas, and partial samples to continue."""

from __future__ import annotations

import base64
from typing import Annotated, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, WithJsonSchema

from rollout.sampling_params import Int


def encode_routed_experts(rows: np.ndarray) -> dict:
    """JSON form of routed experts: {"shape": [tokens, layers, top_k], "dtype": "int16", "data": base64 of the
    little-endian int16 bytes}; `np.frombuffer(base64.b64decode(d["data"]), "<i2").reshape(d["shape"])`."""
    return {"shape": list(rows.shape), "dtype": "int16", "data": base64.b64encode(rows.astype("<i2").tobytes()).decode()}


def _routed_rows(value) -> np.ndarray:
    """Expert ids as an int16 array [tokens, MoE layers, top_k]: from an array, nested lists of integers, or the
    JSON form of `encode_routed_experts`."""
    if isinstance(value, dict):
        try:
            value = np.frombuffer(base64.b64decode(value["data"], validate=True), "<i2").reshape(value["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"routed_experts as a dict must be {{'shape': [tokens, layers, top_k], 'dtype': "
                             f"'int16', 'data': base64 of little-endian int16}}: {exc}") from None
    rows = np.asarray(value)
    if rows.ndim != 3 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
        raise ValueError(f"routed_experts must be integer expert ids [tokens, MoE layers, top_k], got "
                         f"{rows.dtype} of shape {list(rows.shape)}")
    if rows.size and (rows.min() < 0 or rows.max() > np.iinfo(np.int16).max):
        raise ValueError("routed_experts holds ids outside 0..32767")
    return rows.astype(np.int16, copy=False)


# an int16 numpy array in Python; nested lists in model_dump / JSON (the CLI's output)
RoutedExperts = Annotated[
    np.ndarray, PlainValidator(_routed_rows), PlainSerializer(lambda rows: rows.tolist()),
    WithJsonSchema({"description": "int16 expert ids [tokens, MoE layers, top_k]: nested lists, or "
                                   "{shape, dtype, data (base64 of little-endian int16)}"}),
]
ROUTED_EXPERTS_DOC = (
    "Mixture-of-experts models, with return_routed_experts: int16 [tokens, MoE layers, top_k], the experts (global "
    "ids, by descending routing weight) each token was routed to when it went through the model, for the prompt and "
    "every output token but the last (which no forward has fed yet): prompt + output[:-1]."
)


class Sample(BaseModel):
    """One completion of a prompt."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

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
    routed_experts: Optional[RoutedExperts] = Field(None, description=ROUTED_EXPERTS_DOC)


class RolloutOutput(BaseModel):
    """All completions of one prompt, in sample order."""

    request_id: str
    prompt_token_ids: list[int]
    samples: list[Sample]
    prompt_logprobs: Optional[list[float]] = Field(
        None, description="With prompt_logprobs: the raw logprob of every prompt token after the first, under the "
        "weights that computed it (len(prompt_token_ids) - 1 entries).")
    prompt_top_logprobs: Optional[list[dict[int, float]]] = Field(
        None, description="With prompt_logprobs=k > 0: at every prompt token after the first, the k most likely "
        "tokens and their raw logprobs.")


class SampleDelta(BaseModel):
    """What one sample produced since the last delta of its request's stream (`generate_stream`).

    Concatenating a sample's deltas gives its `Sample` (token_ids, logprobs,
    top_logprobs, token_weight_versions, routed_experts along axis 0); its last delta
    carries `finish_reason`.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    request_id: str
    index: int = Field(description="The sample's position in its request (0 .. n-1).")
    token_ids: list[int]
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[dict[int, float]]] = None
    weight_versions: list[int] = Field(description="Per new token, the version of the weights that produced it.")
    finish_reason: Optional[Literal["stop", "length", "abort"]] = None
    stop_reason: Optional[int | str] = None
    routed_experts: Optional[RoutedExperts] = Field(
        None, description="With return_routed_experts: the routed experts' rows added since the last delta (the "
        "first delta holds the prompt's rows, each later token adds the row of the token before it).")


class PartialSample(BaseModel):
    """An earlier sample to continue (e.g. one that ended with finish_reason "abort"): its output tokens after the
    prompt, their logprobs / top logprobs (required when the new request asks for them) and weight versions
    (-1, unknown, when not given), and `index`, the sample's position in its original request, which keys its
    random numbers: with the same prompt, seed and weights, the continuation samples what the uninterrupted
    sample would have. `routed_experts` (optional, used when the new request asks for them): the earlier
    sample's rows for prompt + token_ids[:-1]; the continuation returns them followed by its own."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    token_ids: list[Int]
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[dict[int, float]]] = None
    token_weight_versions: Optional[list[Int]] = None
    index: Int = Field(0, ge=0)
    routed_experts: Optional[RoutedExperts] = None

    @classmethod
    def of(cls, sample: Sample, index: int = 0) -> "PartialSample":
        """The partial sample to continue `sample` (sample `index` of its request)."""
        return cls(token_ids=sample.token_ids, logprobs=sample.logprobs, top_logprobs=sample.top_logprobs,
                   token_weight_versions=sample.token_weight_versions, index=index,
                   routed_experts=sample.routed_experts)
