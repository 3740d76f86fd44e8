"""The worker's pooled device memory: tagged arenas that sleep and wake at fixed addresses."""

from worker.memory.pool import MemoryPool, TensorLayout

__all__ = ["MemoryPool", "TensorLayout"]
