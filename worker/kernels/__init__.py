"""Triton kernels of the CUDA fast path (imported only when CUDA and Triton are present, or by tests)."""
