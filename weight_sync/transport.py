"""Transports move bucket bytes from the trainer (rank 0) to every engine worker.

`send_buckets` and `receive_buckets` are the two halves of one update: each side
works through the same bucket list with two buffers in rotation, so packing or
applying bucket k overlaps moving bucket k+1. A transport says how bytes move
(`GlooTransport` here; NCCL and CUDA IPC in their own modules).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from weight_sync.buckets import Bucket, buffer_bytes, slot_view
from weight_sync.channel import Channel
from weight_sync.errors import WeightTransferError
from weight_sync.group_store import gloo_group
from weight_sync.protocol import torch_dtype

Apply = Callable[[Bucket, torch.Tensor], None]


class Transport:
    """The byte-moving half of a group; the control messages go through `channel`."""

    def __init__(self, channel: Channel, device: torch.device):
        self.channel = channel
        self.device = device
        self._staging: list[torch.Tensor] = []
        self.broken = ""  # why the group can no longer be used, once a transfer failed

    def abort(self, reason: str) -> None:
        """Give the group up after a failed transfer (its collectives may be half done)."""
        self.broken = self.broken or reason

    def begin_update(self, key: str, buckets: list[Bucket], staging: bool) -> None:
        """Prepare for the update whose store keys start with `key`; `staging`: two bucket buffers needed."""
        size = buffer_bytes(buckets)
        if not staging:
            self._staging = []
        elif not self._staging or self._staging[0].numel() < size:
            self._staging = []
            self._staging = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)]

    def end(self, keep_staging: bool) -> None:
        if not keep_staging:
            self._staging = []

    def staging(self, k: int, nbytes: int) -> torch.Tensor:
        return self._staging[k % 2][:nbytes]

    # sender side
    def acquire(self, k: int, nbytes: int) -> torch.Tensor:
        """The buffer to pack bucket k into, once the bucket that used it last has left."""
        raise NotImplementedError

    def send(self, k: int, data: torch.Tensor) -> None:
        raise NotImplementedError

    # receiver side
    def recv(self, k: int, nbytes: int, into: Optional[torch.Tensor]) -> object:
        """Start receiving bucket k (into `into` when given, else where the transport likes)."""
        raise NotImplementedError

    def wait(self, k: int, pending: object) -> torch.Tensor:
        """The bucket's bytes, ready for work queued on the current stream."""
        raise NotImplementedError

    def release(self, k: int) -> None:
        """The bucket has been applied (its buffer may be reused once queued work is done)."""

    def flush(self) -> None:
        """Block until everything queued has finished, or raise WeightTransferError by the timeout."""

    def close(self) -> None:
        """Leave the group: free the staging buffers and the store connection (the trainer stops hosting it)."""
        self._staging = []
        self.channel.close()


class GlooTransport(Transport):
    """CPU broadcast over a gloo group of our own (never the default process group)."""

    def __init__(self, channel: Channel):
        super().__init__(channel, torch.device("cpu"))
        info = channel.info
        try:
            self.group = gloo_group(dist.PrefixStore("gloo/", channel.store), channel.rank, info.world_size,
                                    channel.timeout, info.master_address)
        except Exception as exc:  # noqa: BLE001
            raise WeightTransferError(f"rank {channel.rank} could not form the gloo group: {exc}") from exc
        self._works: dict[int, object] = {}

    def _broadcast(self, data: torch.Tensor):
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.timeout = self.channel.timeout
        return self.group.broadcast([data], opts)

    def _finish(self, k: int, work) -> None:
        try:
            work.wait(self.channel.timeout)
        except Exception as exc:  # noqa: BLE001
            raise WeightTransferError(f"rank {self.channel.rank}: bucket {k} did not arrive: {exc}") from exc

    def acquire(self, k: int, nbytes: int) -> torch.Tensor:
        if k - 2 in self._works:
            self._finish(k - 2, self._works.pop(k - 2))
        return self.staging(k, nbytes)

    def send(self, k: int, data: torch.Tensor) -> None:
        self._works[k] = self._broadcast(data)

    def recv(self, k: int, nbytes: int, into: Optional[torch.Tensor]) -> object:
        data = self.staging(k, nbytes) if into is None else into
        return data, self._broadcast(data)

    def wait(self, k: int, pending: object) -> torch.Tensor:
        data, work = pending
        self._finish(k, work)
        return data

    def flush(self) -> None:
        for k, work in sorted(self._works.items()):
            self._finish(k, work)
        self._works.clear()


def send_buckets(transport: Transport, key: str, buckets: list[Bucket], tensors: Iterator[torch.Tensor]) -> None:
    """Pack the tensors (in update order) bucket by bucket and send them."""
    transport.begin_update(key, buckets, staging=True)
    try:
        for k, bucket in enumerate(buckets):
            buffer = transport.acquire(k, bucket.size)
            for slot in bucket.slots:
                _pack(buffer, slot, next(tensors))
            transport.send(k, buffer)
        transport.flush()
    except BaseException as exc:
        transport.abort(f"{type(exc).__name__}: {exc}")
        raise
    transport.end(keep_staging=True)


def _pack(buffer: torch.Tensor, slot, tensor: torch.Tensor) -> None:
    meta = slot.meta
    if tuple(tensor.shape) != meta.shape or tensor.dtype != torch_dtype(meta.dtype):
        raise ValueError(f"tensor {meta.name} changed since the update was announced: "
                         f"{tensor.dtype} {list(tensor.shape)} instead of {meta.dtype} {list(meta.shape)}")
    slot_view(buffer, slot).copy_(tensor, non_blocking=True)


def receive_buckets(transport: Transport, key: str, buckets: list[Bucket], apply: Apply,
                    direct: Optional[Callable[[Bucket], torch.Tensor]] = None) -> None:
    """Receive every bucket and `apply` it while the next one is in flight.

    `direct(bucket)` names memory the bucket's bytes land in as they are (a
    kernel-format update of the whole weight arena); `apply` then has nothing to do.
    """
    transport.begin_update(key, buckets, staging=direct is None)
    try:
        pending = transport.recv(0, buckets[0].size, direct and direct(buckets[0]))
        for k, bucket in enumerate(buckets):
            data = transport.wait(k, pending)
            if k + 1 < len(buckets):
                nxt = buckets[k + 1]
                pending = transport.recv(k + 1, nxt.size, direct and direct(nxt))
            if direct is None:
                apply(bucket, data)
            transport.release(k)
        transport.flush()
    except BaseException as exc:
        transport.abort(f"{type(exc).__name__}: {exc}")  # before the buffers go: queued receives must stop
        raise
    finally:
        transport.end(keep_staging=False)
