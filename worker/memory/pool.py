"""The memory pool: tagged arenas ("weights", "kv_cache"), the weight layout, sleep and wake."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from worker.memory.arena import Arena, TorchArena, VmmArena

ALIGN = 256
WEIGHTS, KV_CACHE = "weights", "kv_cache"
TAGS = (WEIGHTS, KV_CACHE)


@dataclass(frozen=True)
class TensorLayout:
    """Where one parameter lives in the weights arena."""

    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


class MemoryPool:
    """Owns one worker's arenas (never a process-wide singleton: two engines sleep independently).

    `sleepable` uses CUDA virtual memory on CUDA devices, so arenas can be
    released and restored at the same addresses; on CPU arenas are always sleepable.
    """

    def __init__(self, device: torch.device, sleepable: bool):
        self.device = device
        self.use_vmm = sleepable and device.type == "cuda"
        self.arenas: dict[str, Arena] = {}
        self.backups: dict[str, torch.Tensor] = {}  # host copies, allocated once, reused every cycle
        self.restorable: set[str] = set()  # asleep tags whose contents wait in `backups`
        self.weight_layout: list[TensorLayout] = []

    def allocate(self, tag: str, size: int) -> Arena:
        if tag in self.arenas:
            raise RuntimeError(f"arena {tag!r} already exists")
        cls = VmmArena if self.use_vmm else TorchArena
        self.arenas[tag] = cls(tag, max(size, 1), self.device)
        return self.arenas[tag]

    def view(self, tag: str, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        return self.arenas[tag].data[offset : offset + nbytes].view(dtype).view(shape)

    def place_parameters(self, module: nn.Module) -> list[TensorLayout]:
        """Move every parameter of `module` into one new "weights" arena (tied parameters once)."""
        params = dict(module.named_parameters())
        offset, layout = 0, []
        for name, param in params.items():
            offset = -(-offset // ALIGN) * ALIGN
            layout.append(TensorLayout(name, offset, tuple(param.shape), param.dtype))
            offset += layout[-1].nbytes
        self.allocate(WEIGHTS, offset)
        replacement = {}
        for entry in layout:
            old = params[entry.name]
            new = nn.Parameter(self.view(WEIGHTS, entry.offset, entry.shape, entry.dtype), requires_grad=False)
            if not old.is_meta:
                new.data.copy_(old.data)
            if hasattr(old, "weight_loader"):
                new.weight_loader = old.weight_loader
            replacement[id(old)] = new
        for sub in module.modules():
            for key, param in sub._parameters.items():
                if param is not None and id(param) in replacement:
                    sub._parameters[key] = replacement[id(param)]
        self.weight_layout = layout
        return layout

    def asleep(self) -> set[str]:
        return {tag for tag, arena in self.arenas.items() if not arena.resident}

    def sleep(self, offload: Iterable[str]) -> None:
        """Release every resident arena; the `offload` ones are first copied to host memory."""
        awake = [arena for arena in self.arenas.values() if arena.resident]
        keep = [arena for arena in awake if arena.tag in set(offload)]
        for arena in keep:
            self._backup(arena).copy_(arena.data, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for arena in awake:
            arena.release()
            if arena in keep:
                self.restorable.add(arena.tag)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake(self, tags: Iterable[str]) -> set[str]:
        """Restore the named arenas; returns those that came back without their contents.

        Arenas with a host copy go first, so their host->device copies run while
        the others are being mapped.
        """
        empty = set()
        for tag in sorted(set(tags), key=lambda t: t not in self.restorable):
            arena = self.arenas[tag]
            if arena.resident:
                continue
            arena.restore()
            if tag in self.restorable:
                arena.data.copy_(self.backups[tag], non_blocking=True)
                self.restorable.discard(tag)
            else:
                empty.add(tag)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return empty

    def close(self) -> None:
        """Free every arena and host backup for good."""
        for arena in self.arenas.values():
            arena.close()
        self.arenas.clear()
        self.backups.clear()
        self.restorable.clear()

    def _backup(self, arena: Arena) -> torch.Tensor:
        if arena.tag not in self.backups:
            pin = self.device.type == "cuda"
            self.backups[arena.tag] = torch.empty(arena.size, dtype=torch.uint8, pin_memory=pin)
        return self.backups[arena.tag]
