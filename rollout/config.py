"""The engine's public configuration."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from rollout.sampling_params import MAX_SEED
from worker.config import WorkerConfig


class EngineConfig(WorkerConfig):
    """Everything `RolloutEngine` needs: the worker's settings plus the scheduler's.

    Build it directly or pass the same fields as keyword arguments to `RolloutEngine`.
    """

    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Seed for requests that do not carry their own, 0 to 2**63 - 1."
    )
    max_num_seqs: int = Field(256, ge=1, description="Most sequences (samples) running at once.")
    max_num_batched_tokens: int = Field(
        8192, ge=1, description="Most tokens computed in one step; longer prompts are prefilled in chunks."
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of earlier requests with the same prefix.")
    num_decode_steps: int = Field(
        8, ge=1, le=64, description="Decode steps run back to back on the device per scheduling round when every "
        "running sample decodes with plain sampling (temperature / greedy, no filters, bans or top logprobs); "
        "the host reads the tokens once per round, and the next round for the same samples is queued before "
        "they are read. A sample that stops mid-round wastes the rest of it and the queued one. 1 schedules "
        "every step."
    )
    executor: Literal["local", "ray"] = Field(
        "local", description="'local': this process, one device. 'ray': replicas of Ray actors (see README, Ray)."
    )
    data_parallel_size: int = Field(1, ge=1, description="Replicas of the model (executor='ray').")

    @model_validator(mode="after")
    def _check_executor(self) -> "EngineConfig":
        if self.executor == "local" and self.data_parallel_size > 1:
            raise ValueError(f"data_parallel_size={self.data_parallel_size} needs executor='ray'")
        return self

    @model_validator(mode="after")
    def _check_block_budget(self) -> "EngineConfig":
        if self.num_kv_blocks is not None and self.max_model_len is not None:
            needed = -(-self.max_model_len // self.block_size)
            if self.num_kv_blocks < needed:
                raise ValueError(
                    f"num_kv_blocks={self.num_kv_blocks} cannot hold one sequence of max_model_len="
                    f"{self.max_model_len} tokens: it needs at least {needed} blocks of {self.block_size}"
                )
        return self


def engine_config(config: Optional[EngineConfig], fields: dict) -> EngineConfig:
    """`config`, or an EngineConfig built from keyword fields (not both)."""
    if config is None:
        return EngineConfig(**fields)
    if fields:
        raise TypeError(f"pass either an EngineConfig or keyword fields, not both (got {sorted(fields)})")
    return config
