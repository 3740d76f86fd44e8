"""The bucket layout both sides derive from an update's tensor list.

Tensors are laid out one after another in a flat byte space, each at a
256-byte-aligned offset (the engine's weight arena uses the same rule, so a
kernel-format update of the whole arena has the arena's own layout). Buckets
cut that space at tensor boundaries into runs of at most `bucket_bytes`; a
tensor larger than that gets a bucket of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weight_sync.protocol import TensorMeta, torch_dtype

ALIGN = 256
MIN_AUTO_BUCKET, MAX_AUTO_BUCKET = 256 << 20, 1 << 30


def auto_bucket_bytes(tensors: list[TensorMeta]) -> int:
    """A bucket size for an update: an eighth of its bytes, within 256 MiB .. 1 GiB.

    Measured on H200s (benchmarks/RESULTS.md): small models gain from several
    buckets in flight (packing overlaps the broadcast); large ones from fewer, larger calls.
    """
    total = sum(meta.nbytes for meta in tensors)
    return min(MAX_AUTO_BUCKET, max(MIN_AUTO_BUCKET, total // 8))


@dataclass(frozen=True)
class Slot:
    """One tensor inside a bucket."""

    index: int  # position in the update's tensor list
    offset: int  # byte offset inside the bucket
    meta: TensorMeta


@dataclass(frozen=True)
class Bucket:
    start: int  # byte offset of the bucket in the flat layout
    size: int
    slots: tuple[Slot, ...]


def flat_offsets(tensors: list[TensorMeta]) -> list[int]:
    """Aligned byte offset of each tensor in the flat layout."""
    offsets, end = [], 0
    for meta in tensors:
        start = -(-end // ALIGN) * ALIGN
        offsets.append(start)
        end = start + meta.nbytes
    return offsets


def plan_buckets(tensors: list[TensorMeta], bucket_bytes: int) -> list[Bucket]:
    """Cut the flat layout into buckets of at most `bucket_bytes` (or one oversized tensor)."""
    buckets: list[Bucket] = []
    group: list[tuple[int, int]] = []  # (index, flat offset)

    def close() -> None:
        start = group[0][1]
        last = tensors[group[-1][0]]
        slots = tuple(Slot(i, off - start, tensors[i]) for i, off in group)
        buckets.append(Bucket(start, group[-1][1] + last.nbytes - start, slots))

    for index, offset in enumerate(flat_offsets(tensors)):
        if group and offset + tensors[index].nbytes - group[0][1] > bucket_bytes:
            close()
            group = []
        group.append((index, offset))
    close()
    return buckets


def buffer_bytes(buckets: list[Bucket]) -> int:
    """Size of a staging buffer that holds any bucket."""
    return max(bucket.size for bucket in buckets)


def slot_view(buffer: torch.Tensor, slot: Slot) -> torch.Tensor:
    """The tensor of `slot` inside a uint8 bucket buffer."""
    meta = slot.meta
    return buffer[slot.offset : slot.offset + meta.nbytes].view(torch_dtype(meta.dtype)).view(meta.shape)
