"""Checkpoint-format (name, tensor) pairs from whatever the trainer holds.

Plain and Hugging Face modules give their parameter names as they are (the
names `save_pretrained` writes). Wrappers are looked through: DDP (`.module`),
`torch.compile` (`._orig_mod`). FSDP2 parameters are DTensors: their metadata
(global shape) is known without communication, and each is gathered with
`full_tensor()` only when its turn comes, so the trainer holds one full
parameter at a time. Every FSDP2 rank must iterate in step (see
`participate_in_send`), since each gather is a collective.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional, Union

import torch
from torch import nn

from weight_sync.protocol import TensorMeta, dtype_name

Weights = Union[nn.Module, dict, Iterable[tuple[str, torch.Tensor]]]


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside DDP / torch.compile wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "full_tensor")


def _named(weights: Weights) -> list[tuple[str, torch.Tensor]]:
    if isinstance(weights, nn.Module):
        return [(name, p) for name, p in unwrap(weights).named_parameters()]
    items = list(weights.items() if isinstance(weights, dict) else weights)
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"weights must be an nn.Module, a dict or (name, tensor) pairs; got an item {item!r:.80}")
    return items


def tensor_metas(weights: Weights, dtype: Optional[torch.dtype] = None) -> list[TensorMeta]:
    """Name, dtype (or `dtype` when casting) and global shape of each tensor, without gathering anything."""
    # built without pydantic's per-field validation: dtype_name checks the dtype, torch the shape
    return [
        TensorMeta.model_construct(name=name, dtype=dtype_name(dtype or t.dtype), shape=tuple(t.shape))
        for name, t in _named(weights)
    ]


def iter_tensors(weights: Weights, dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) pairs in `tensor_metas` order; DTensors gathered one at a time."""
    for name, tensor in _named(weights):
        tensor = tensor.detach()
        if _is_dtensor(tensor):
            tensor = tensor.full_tensor()
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        yield name, tensor


def participate_in_send(weights: Weights, dtype: Optional[torch.dtype] = None) -> None:
    """On every trainer rank but 0, while rank 0 sends: take part in each FSDP2 gather, in order."""
    for _ in iter_tensors(weights, dtype):
        pass
