"""Tensor parallelism: a worker's group of ranks and the collectives the model layers use.

Every rank of a group runs the same engine loop on the same requests (SPMD), so
each step's batch is identical everywhere and only activations travel: an
all-reduce after row-parallel layers and the embedding, an all-gather of the
logits (so every rank samples the same tokens). The group is our own (gloo on
CPU, NCCL on CUDA, meeting through a store hosted by rank 0 that admits only
ranks holding the group's secret) and never touches a default process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from weight_sync.group_store import GroupStore, StoreError, gloo_group
from weight_sync.protocol import check_secret


class TensorParallelInit(BaseModel):
    """Where the ranks of one tensor-parallel group meet (set by an executor, one per rank)."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # inputs may hold the secret

    rank: int = Field(ge=0)
    size: int = Field(ge=1)
    master_address: str = Field("127.0.0.1", description="Rank 0's host; its store listens on exactly this address.")
    master_port: int = Field(ge=1, le=65535, description="Port of the group's store, hosted by rank 0.")
    timeout_s: float = Field(300.0, gt=0)
    secret: SecretStr = Field(min_length=16, repr=False,
                              description="The same for every rank (e.g. weight_sync.protocol.new_secret()); a rank "
                                          "without it is refused.")

    _check_secret = field_validator("secret")(check_secret)


def check_divides(size: int, dims: dict[str, int]) -> None:
    """Raise ValueError unless `size` ranks split every named dimension evenly."""
    bad = [f"{name} ({value})" for name, value in dims.items() if value % size]
    if bad:
        raise ValueError(f"tensor_parallel_size={size} must divide {', '.join(bad)}")


@dataclass
class TensorParallel:
    """This worker's place in its tensor-parallel group (size 1: no group, every collective is a no-op)."""

    rank: int = 0
    size: int = 1
    group: Optional[object] = None

    @classmethod
    def join(cls, init: TensorParallelInit, device: torch.device) -> "TensorParallel":
        if init.size == 1:
            return cls()
        if init.rank >= init.size:
            raise ValueError(f"tensor-parallel rank {init.rank} is outside a group of size {init.size}")
        timeout = timedelta(seconds=init.timeout_s)
        try:
            store = GroupStore(init.master_address, init.master_port, init.secret.get_secret_value(), init.rank,
                               timeout, is_host=init.rank == 0)
        except StoreError as exc:
            raise RuntimeError(f"tensor-parallel rank {init.rank} could not join its group: {exc}") from None
        try:
            store.meet(init.size, "tensor-parallel group")
        except StoreError as exc:
            store.close()
            raise RuntimeError(f"tensor-parallel rank {init.rank} could not join its group: {exc}") from None
        prefixed = dist.PrefixStore("tp/", store)
        try:
            if device.type == "cuda":
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = timeout
                group = dist.ProcessGroupNCCL(prefixed, init.rank, init.size, options)
            else:
                group = gloo_group(prefixed, init.rank, init.size, timeout, init.master_address)
        except BaseException:
            store.close()  # frees the port (and, on rank 0, the store's process) for a retry
            raise
        tp = cls(init.rank, init.size, group)
        tp._store = store  # the store must outlive the group
        return tp

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group, in place."""
        if self.size > 1:
            self.group.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` along the last dimension, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.group.allgather([parts], [x.contiguous()]).wait()
        return torch.cat(parts, dim=-1)

    def split(self, total: int, what: str) -> int:
        """This rank's share of `total` (which must divide evenly)."""
        if total % self.size:
            raise ValueError(f"tensor_parallel_size={self.size} must divide {what} ({total})")
        return total // self.size
