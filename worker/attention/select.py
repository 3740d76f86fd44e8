"""Choosing an attention backend by name (kept apart from the base class, which every backend imports)."""

from __future__ import annotations

import torch

from worker import kernels
from worker.attention.backend import AttentionBackend
from worker.attention.reference import ReferenceBackend


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """The backend called `name`: 'auto' is 'triton' on CUDA (when Triton imports), else 'reference'."""
    fast = device.type == "cuda" and kernels.available()
    if name == "reference" or (name == "auto" and not fast):
        return ReferenceBackend()
    if name in ("auto", "triton"):
        if not fast:
            raise ValueError(f"attention_backend='triton' needs a CUDA device and Triton; the worker is on {device}")
        from worker.attention.triton_backend import TritonBackend

        return TritonBackend(device)
    raise ValueError(f"unknown attention backend {name!r}; available: 'auto', 'reference', 'triton'")
