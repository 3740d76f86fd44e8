"""What the worker's device memory is used for, itemized."""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from worker.memory.pool import MemoryPool


class ArenaReport(BaseModel):
    size_bytes: int = Field(description="Bytes the arena's tensors span.")
    mapped_bytes: int = Field(description="Device bytes backing it now (0 while asleep).")
    resident: bool
    host_backup_bytes: int = Field(description="Pinned host buffer kept for level-1 sleep (allocated once).")


class MemoryReport(BaseModel):
    """Device memory of one worker. On CPU the device figures are 0."""

    device: str
    arenas: dict[str, ArenaReport]
    device_used_bytes: int = Field(description="Used on the whole device (all processes), from cudaMemGetInfo.")
    device_total_bytes: int
    torch_allocated_bytes: int = Field(description="Live tensors of torch's caching allocator (not the arenas).")
    torch_reserved_bytes: int = Field(description="Held by torch's caching allocator, live or cached.")
    other_bytes: int = Field(
        description="Used on the device beyond the arenas and torch's allocator in this process: CUDA context, "
        "cuBLAS workspaces, graph pools, communicator buffers, and other processes."
    )


def memory_report(pool: MemoryPool, device: torch.device) -> MemoryReport:
    arenas = {
        tag: ArenaReport(
            size_bytes=arena.size,
            mapped_bytes=arena.mapped_bytes,
            resident=arena.resident,
            host_backup_bytes=pool.backups[tag].numel() if tag in pool.backups else 0,
        )
        for tag, arena in pool.arenas.items()
    }
    used = total = allocated = reserved = 0
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        allocated = torch.cuda.memory_allocated(device)
        reserved = torch.cuda.memory_reserved(device)
    mapped = sum(a.mapped_bytes for a in arenas.values()) if pool.use_vmm else 0
    return MemoryReport(
        device=str(device),
        arenas=arenas,
        device_used_bytes=used,
        device_total_bytes=total,
        torch_allocated_bytes=allocated,
        torch_reserved_bytes=reserved,
        other_bytes=max(0, used - mapped - reserved) if device.type == "cuda" else 0,
    )
