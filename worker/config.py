"""Configuration the worker needs: which model, on which device, how much KV cache."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DTYPES = ("auto", "float32", "bfloat16", "float16")


class WorkerConfig(BaseModel):
    """Model, device and KV-cache settings of one worker.

    `EngineConfig` extends this with the scheduler's settings; a worker only ever
    sees these fields.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    model: str = Field(description="Path of a Hugging Face checkpoint directory (config.json + safetensors).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute and weight dtype. 'auto': float32 on CPU, the checkpoint's dtype on CUDA."
    )
    device: str = Field("auto", description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    seed: int = Field(0, ge=0, description="Seed for requests that do not carry their own.")
    max_model_len: Optional[int] = Field(
        None, ge=1, description="Longest prompt + output in tokens. Default: the model's max_position_embeddings."
    )
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV-cache block.")
    num_kv_blocks: Optional[int] = Field(None, ge=1, description="KV-cache blocks. Default: from the memory budget.")
    kv_cache_memory_bytes: Optional[int] = Field(
        None, ge=1, description="KV-cache budget in bytes when num_kv_blocks is unset. CPU default: 256 MiB."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="On CUDA, fraction of device memory the worker may use (KV cache sized to fit)."
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="Ranks one model is split over (one process each, started by an executor)."
    )
    expert_parallel_size: int = Field(
        1, ge=1, description="MoE models: groups the tensor-parallel ranks split the experts over (each rank holds "
        "num_experts / expert_parallel_size experts, their intermediate dim split over the tensor_parallel_size / "
        "expert_parallel_size ranks of its group); must divide tensor_parallel_size and num_experts."
    )
    load_format: Literal["safetensors", "dummy"] = Field(
        "safetensors", description="'dummy': random weights (normal, std 0.02; norms near 1) drawn on the device "
        "for the config in `model` (config.json alone is enough; every rank draws its own), for benchmarks of "
        "models too large to write as a checkpoint. Weight updates load over them as usual."
    )
    enable_sleep_mode: bool = Field(False, description="Keep weights and KV cache in the sleepable memory pool.")
    check_finite_weights: bool = Field(
        False, description="Refuse weights holding NaN or Inf with a CheckpointError (a checkpoint at construction; "
        "load_weights before copying, at the cost of one pass over its tensors where they live) instead of warning."
    )
    attention_backend: Literal["auto", "reference", "triton"] = Field(
        "auto", description="'triton': Triton paged kernels (CUDA). 'reference': pure torch (CPU and GPU, the "
        "oracle). 'auto': 'triton' on CUDA, else 'reference'."
    )

    enforce_eager: bool = Field(
        False, description="Run decode steps eagerly instead of replaying CUDA graphs (graphs need CUDA, the "
        "Triton backend and tensor_parallel_size 1)."
    )
    cuda_graph_max_batch_size: int = Field(
        256, ge=1, le=1024, description="Largest decode batch replayed from a CUDA graph; larger ones run eagerly."
    )

    @model_validator(mode="after")
    def _check_expert_parallel(self) -> "WorkerConfig":
        if self.tensor_parallel_size % self.expert_parallel_size:
            raise ValueError(f"expert_parallel_size={self.expert_parallel_size} must divide tensor_parallel_size="
                             f"{self.tensor_parallel_size} (experts are split over the tensor-parallel ranks)")
        return self

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
