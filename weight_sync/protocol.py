"""The wire protocol both sides agree on: how to join a group and what one update contains.

Messages are pydantic models, sent as JSON over the group's TCP store (never pickle).
"""

from __future__ import annotations

import math
import secrets
import socket
from collections import Counter
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64", "float8_e4m3fn", "float8_e5m2")
ITEMSIZE = {name: getattr(torch, name).itemsize for name in FLOAT_DTYPES}
_NAMES = {getattr(torch, name): name for name in FLOAT_DTYPES}
DEFAULT_BUCKET_BYTES = 256 << 20


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a protocol dtype name ("bfloat16", ...)."""
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """The protocol name of a torch dtype; only floating dtypes travel."""
    name = _NAMES.get(dtype)
    if name is None:
        raise ValueError(f"weights must have a floating dtype ({', '.join(FLOAT_DTYPES)}), got {dtype}")
    return name


def check_secret(value: SecretStr) -> SecretStr:
    """A group secret: printable characters without whitespace (it is framed by a newline on its way to the
    store's process)."""
    text = value.get_secret_value()
    if not text.isprintable() or any(c.isspace() for c in text):
        raise ValueError("the secret must be printable characters without whitespace")
    return value


class TensorMeta(BaseModel):
    """Name, dtype and shape of one tensor of an update."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1)
    dtype: str
    shape: tuple[int, ...]

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        if value not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(FLOAT_DTYPES)} (weights are floating point), got {value!r}")
        return value

    @field_validator("shape")
    @classmethod
    def _check_shape(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < 0 for d in value):
            raise ValueError(f"shape dimensions must be >= 0, got {list(value)}")
        return value

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> "TensorMeta":
        return cls(name=name, dtype=dtype_name(tensor.dtype), shape=tuple(tensor.shape))


class TransferInitInfo(BaseModel):
    """How to join a weight-transfer group: rank 0 is the trainer, ranks from `rank_offset` the engine's workers.

    The trainer hosts the group's store on exactly master_address:master_port.
    Every member proves `secret` before the store lets it in (a random one is
    made when the info is built: build it once, on the trainer side, and hand the
    same object to the engine; it survives pickling, e.g. through Ray, but JSON
    dumps mask it). Every wait (joining, handshakes, each bucket) gives up after
    `timeout_s`.
    """

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # inputs may hold the secret

    backend: Literal["nccl", "ipc", "gloo"] = Field(
        description="'nccl': broadcast between GPUs; 'ipc': trainer and engine share GPUs (CUDA IPC); 'gloo': CPU."
    )
    master_address: str = Field("127.0.0.1", description="Host of the trainer (rank 0), where the store listens.")
    master_port: int = Field(ge=1, le=65535, description="Port of the group's TCP store on the trainer's host.")
    world_size: int = Field(2, ge=2, description="The trainer plus every engine worker.")
    rank_offset: int = Field(1, ge=1, description="Group rank of the engine's first worker (its workers follow).")
    timeout_s: float = Field(120.0, gt=0, description="Longest wait for the other side at any point of a transfer.")
    group_name: str = Field("weight_sync", min_length=1, description="Namespace of the group's keys in the store.")
    secret: SecretStr = Field(default_factory=lambda: new_secret(), min_length=16, repr=False,
                              description="Shared by the members of the group; never logged or shown.")

    _check_secret = field_validator("secret")(check_secret)

    @model_validator(mode="after")
    def _check_ranks(self) -> "TransferInitInfo":
        if self.rank_offset >= self.world_size:
            raise ValueError(f"rank_offset={self.rank_offset} must be below world_size={self.world_size}")
        return self

    @classmethod
    def local(cls, backend: str, world_size: int = 2, **fields) -> "TransferInitInfo":
        """An init info on this host with a free port."""
        return cls(backend=backend, master_port=free_port(), world_size=world_size, **fields)


class UpdateInfo(BaseModel):
    """One versioned update: the ordered tensors both sides derive the bucket layout from."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, strict=True, description="Must be newer than the engine's weight_version.")
    format: Literal["checkpoint", "kernel"] = Field(
        "checkpoint", description="'checkpoint': Hugging Face names; 'kernel': the engine's own parameters."
    )
    tensors: list[TensorMeta] = Field(min_length=1, description="What is sent, in sending order.")
    bucket_bytes: int = Field(DEFAULT_BUCKET_BYTES, ge=1 << 10, description="Target bytes per bucket.")
    partial: bool = Field(False, description="A subset of the weights; a full update must cover every tensor.")

    @model_validator(mode="after")
    def _check_names(self) -> "UpdateInfo":
        repeated = sorted(name for name, count in Counter(t.name for t in self.tensors).items() if count > 1)
        if repeated:
            raise ValueError(f"tensor names must be unique; repeated: {repeated[:8]}")
        return self


class Announcement(BaseModel):
    """What the trainer posts for its next update: the update, or why it could not send one."""

    update: Optional[UpdateInfo] = None
    error: str = ""


class Ack(BaseModel):
    """An engine worker's answer to an update: accepted, or rejected with the reason."""

    ok: bool
    error: str = ""


def new_secret() -> SecretStr:
    """A fresh random group secret."""
    return SecretStr(secrets.token_urlsafe(32))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
