"""Triton kernels of the CUDA fast path.

Nothing here is imported on a machine without CUDA (tests import the modules
directly, under Triton's interpreter). `available()` says whether the fast
path can run in this process.
"""

from __future__ import annotations

import functools


@functools.cache
def available() -> bool:
    """True when CUDA is present and Triton imports (the fast path's kernels can run)."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_for(x) -> bool:
    """Whether the Triton kernels should compute on tensor `x` (a CUDA tensor, with Triton present)."""
    return x.is_cuda and available()
