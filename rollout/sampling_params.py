"""Per-request sampling settings."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class SamplingParams(BaseModel):
    """How to sample one prompt's completions.

    temperature 0 is greedy. top_k / top_p / min_p filter the distribution after
    temperature; the sampled token and its "processed" logprob come from the
    filtered distribution, "raw" logprobs are the plain log-softmax of the logits.
    A `seed` makes the request's samples reproducible whatever else is batched
    with it; the random numbers are keyed by (seed, prompt, sample index, position).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(1, ge=1, description="Completions per prompt.")
    temperature: float = Field(1.0, ge=0.0, description="0 = greedy.")
    top_k: int = Field(-1, description="Keep the k most likely tokens; -1 or 0 = all.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus: smallest set with this much mass.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens below min_p * p(most likely).")
    max_tokens: int = Field(16, ge=1, description="Most new tokens per completion.")
    min_tokens: int = Field(0, ge=0, description="Stop conditions are ignored until this many tokens are out.")
    stop_token_ids: list[int] = Field(default_factory=list, description="Extra token ids that end a completion.")
    stop: list[str] = Field(default_factory=list, description="Strings that end a completion (needs a tokenizer).")
    ignore_eos: bool = Field(False, description="Keep going past the model's end-of-sequence token.")
    seed: Optional[int] = Field(None, ge=0, description="Per-request seed; None draws one from the engine's seed.")
    logprobs: bool = Field(False, description="Return the logprob of every sampled token.")
    logprobs_mode: Literal["processed", "raw"] = Field("processed", description="Distribution the logprobs are of.")
    top_logprobs: int = Field(0, ge=0, le=64, description="Also return this many most likely (token, logprob) pairs.")

    @field_validator("top_k")
    @classmethod
    def _check_top_k(cls, value: int) -> int:
        if value < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or >= 1, got {value}")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must be non-empty")
        return value

    @model_validator(mode="after")
    def _check_min_max(self) -> "SamplingParams":
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} must not exceed max_tokens={self.max_tokens}")
        return self
