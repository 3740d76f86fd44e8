"""Arenas: one contiguous range of device memory that can be released and brought back.

`VmmArena` (CUDA, sleep mode): a virtual address range reserved once and backed
by physical chunks through the driver's virtual memory API; releasing unmaps
the chunks, restoring maps new ones at the same addresses, so every tensor view
and captured CUDA graph stays valid. `TorchArena` (CPU, or CUDA without sleep
mode): one torch storage, resized to zero and back on CPU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from worker.memory import cuda_driver

CHUNK_BYTES = 256 << 20  # measured on H200: 1 GiB chunks cost ~30x more per byte to create


class Arena(ABC):
    """`size` bytes exposed as the flat uint8 tensor `data`; `resident` says whether memory backs it."""

    def __init__(self, tag: str, size: int, device: torch.device):
        self.tag = tag
        self.size = size
        self.device = device
        self.resident = True
        self.data: torch.Tensor

    @abstractmethod
    def release(self) -> None:
        """Give the memory back; contents are lost, addresses are kept."""

    @abstractmethod
    def restore(self) -> None:
        """Back the arena with memory again (contents undefined)."""

    @property
    def mapped_bytes(self) -> int:
        """Device bytes held now."""
        return self.size if self.resident else 0

    def close(self) -> None:
        """Free everything for good; tensors over the arena must not be used afterwards."""
        if self.resident:
            self.release()


class TorchArena(Arena):
    """A plain torch allocation. Releasable on CPU only (storage resized to zero and back)."""

    def __init__(self, tag: str, size: int, device: torch.device):
        super().__init__(tag, size, device)
        self.data = torch.empty(size, dtype=torch.uint8, device=device)

    def close(self) -> None:
        self.data.untyped_storage().resize_(0)
        self.resident = False

    def release(self) -> None:
        if self.device.type != "cpu":
            raise RuntimeError(f"arena {self.tag!r} on {self.device} cannot sleep: start the engine with "
                               f"enable_sleep_mode=True")
        self.data.untyped_storage().resize_(0)
        self.resident = False

    def restore(self) -> None:
        self.data.untyped_storage().resize_(self.size)
        self.resident = True


class _DeviceMemory:
    """What `torch.as_tensor` needs to wrap a raw device address without copying."""

    def __init__(self, ptr: int, size: int):
        self.__cuda_array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (ptr, False), "version": 3}


class VmmArena(Arena):
    """CUDA virtual memory: fixed addresses, physical chunks mapped and unmapped on demand."""

    def __init__(self, tag: str, size: int, device: torch.device):
        super().__init__(tag, size, device)
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.synchronize(device)  # the driver calls below need the device's primary context current
        grain = cuda_driver.granularity(self.index)
        self.reserved = max(grain, -(-size // grain) * grain)
        chunk = max(grain, CHUNK_BYTES // grain * grain)
        self.chunks = [(off, min(chunk, self.reserved - off)) for off in range(0, self.reserved, chunk)]
        self.base: int | None = None
        self.base = cuda_driver.reserve(self.reserved, grain)
        self.handles: list[int] = []
        self.resident = False
        try:
            self.restore()
        except cuda_driver.CudaDriverError:
            cuda_driver.free_reservation(self.base, self.reserved)
            self.base = None
            raise
        self.data = torch.as_tensor(_DeviceMemory(self.base, size), device=device)

    def restore(self) -> None:
        if self.resident:
            return
        try:
            for off, length in self.chunks:
                self.handles.append(cuda_driver.create_and_map(self.base + off, length, self.index))
        except cuda_driver.CudaDriverError:
            self._unmap()
            raise
        self.resident = True

    def release(self) -> None:
        torch.cuda.synchronize(self.device)
        self._unmap()
        self.resident = False

    def _unmap(self) -> None:
        for (off, length), handle in zip(self.chunks, self.handles):
            cuda_driver.unmap_and_release(self.base + off, length, handle)
        self.handles = []

    @property
    def mapped_bytes(self) -> int:
        return self.reserved if self.resident else 0

    def close(self) -> None:
        if self.base is None:
            return
        if self.resident:
            self.release()
        cuda_driver.free_reservation(self.base, self.reserved)
        self.base = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the driver may already be gone
            pass
