"""What `RolloutEngine.generate` returns."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field


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
