"""Per-request sampling settings."""

from __future__ import annotations

import numbers
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

MAX_SEED = 2**63 - 1  # seeds are 63-bit: the sampler's hash keys each sample on them without collisions
MAX_TOP_K = 2**31 - 1
# The samplers (torch and Triton) divide float32 logits by the temperature; a logit past
# 3.4e38 * temperature overflows to inf and the row's logprobs become NaN. At MIN_TEMPERATURE
# logits up to 3.4e8 in magnitude are safe (measured: both samplers pick the greedy token with
# finite logprobs until max |logit| / temperature reaches 3.4e38). Temperatures past 3.4e38 are
# inf in float32; long before MAX_TEMPERATURE every distribution is uniform.
MIN_TEMPERATURE = 1e-30
MAX_TEMPERATURE = 1e30


def is_integer(value) -> bool:
    """An int or numpy integer; bools (and floats, strings) are not."""
    return type(value) is int or (isinstance(value, numbers.Integral) and not isinstance(value, bool))


def _integer(value):
    if not is_integer(value):
        raise ValueError(f"expected an integer, got {type(value).__name__} {value!r}")
    return int(value)


def _number(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"expected a number, got {type(value).__name__} {value!r}")
    return float(value)


# pydantic would turn True into 1 and "2" or 2.0 into 2; these take numbers of the right kind only
Int = Annotated[int, BeforeValidator(_integer)]
Float = Annotated[float, BeforeValidator(_number)]


class SamplingParams(BaseModel):
    """How to sample one prompt's completions.

    temperature 0 is greedy. top_k / top_p / min_p filter the distribution after
    temperature; the sampled token and its "processed" logprob come from the
    filtered distribution, "raw" logprobs are the plain log-softmax of the logits.
    A `seed` makes the request's samples reproducible whatever else is batched
    with it; the random numbers are keyed by (seed, prompt, sample index, position).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: Int = Field(1, ge=1, description="Completions per prompt.")
    temperature: Float = Field(
        1.0, allow_inf_nan=False,
        description=f"0 = greedy; else from {MIN_TEMPERATURE} to {MAX_TEMPERATURE} (smaller ones overflow float32 "
        "logits: the largest |logit| must stay below 3.4e38 * temperature).",
    )
    top_k: Int = Field(-1, le=MAX_TOP_K, description="Keep the k most likely tokens; -1 or 0 = all.")
    top_p: Float = Field(1.0, gt=0.0, le=1.0, description="Nucleus: smallest set with this much mass.")
    min_p: Float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens below min_p * p(most likely).")
    max_tokens: Int = Field(16, ge=0, description="Most new tokens per completion; 0 only with prompt_logprobs "
                            "(scores the prompt, generates nothing).")
    min_tokens: Int = Field(0, ge=0, description="Stop conditions are ignored until this many tokens are out.")
    stop_token_ids: list[Int] = Field(default_factory=list, description="Extra token ids that end a completion.")
    stop: list[str] = Field(default_factory=list, description="Strings that end a completion (needs a tokenizer).")
    ignore_eos: bool = Field(False, description="Keep going past the model's end-of-sequence token.")
    seed: Optional[Int] = Field(
        None, ge=0, le=MAX_SEED, description="Per-request seed, 0 to 2**63 - 1; None draws one from the engine's seed."
    )
    logprobs: bool = Field(False, description="Return the logprob of every sampled token.")
    logprobs_mode: Literal["processed", "raw"] = Field("processed", description="Distribution the logprobs are of.")
    top_logprobs: Int = Field(0, ge=0, le=64, description="Also return this many most likely (token, logprob) pairs.")
    repetition_penalty: Float = Field(
        1.0, gt=0.0, allow_inf_nan=False,
        description="> 0; tokens of the prompt or the output so far have positive logits divided by it and negative "
        "ones multiplied (1 = off; vLLM's definition, before temperature).")
    presence_penalty: Float = Field(
        0.0, ge=-2.0, le=2.0, description="-2 to 2: subtracted from the logit of every token already in the output.")
    frequency_penalty: Float = Field(
        0.0, ge=-2.0, le=2.0,
        description="-2 to 2: times the number of occurrences in the output so far, subtracted from the logit.")
    prompt_logprobs: Optional[Int] = Field(
        None, ge=0, description="Score the prompt: `RolloutOutput.prompt_logprobs` (the raw logprob of every prompt "
        "token after the first) and, when > 0, `prompt_top_logprobs` (that many most likely tokens at each).")
    return_routed_experts: bool = Field(
        False, description="Mixture-of-experts models: return `Sample.routed_experts`, the experts each token of "
        "prompt + output[:-1] was routed to in every MoE layer (see README, Mixture of experts)."
    )

    @field_validator("temperature")
    @classmethod
    def _check_temperature(cls, value: float) -> float:
        if value != 0 and not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or from {MIN_TEMPERATURE} to {MAX_TEMPERATURE}, got {value}")
        return value

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
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise ValueError("max_tokens=0 needs prompt_logprobs (scoring without generating); else max_tokens >= 1")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} must not exceed max_tokens={self.max_tokens}")
        return self
