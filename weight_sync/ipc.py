"""CUDA IPC for a trainer and engine sharing a GPU: the engine reads the trainer's bucket buffers.

The trainer packs each bucket into one of two buffers whose CUDA IPC handles it
posts (base64 in JSON on the group's store, no pickle); the engine maps them and
applies straight from them, so it needs no staging memory of its own. Store keys
say when a bucket is ready and when every worker is done with it; interprocess
CUDA events order the GPU work behind those flags, so neither side waits for
the GPU on the host until the end.
"""

from __future__ import annotations

import base64
import json
from typing import Optional

import torch

from weight_sync.buckets import Bucket
from weight_sync.channel import Channel
from weight_sync.errors import WeightTransferError
from weight_sync.protocol import Ack
from weight_sync.transport import Transport


def _gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _share(buffer: torch.Tensor) -> list:
    """The IPC description of a CUDA buffer's storage, JSON-ready."""
    return [_b64(a) if isinstance(a, bytes) else a for a in buffer.untyped_storage()._share_cuda_()]


def _open_event(handle: str, device: torch.device) -> torch.cuda.Event:
    return torch.cuda.Event.from_ipc_handle(device, base64.b64decode(handle))


def _open(shared: list, device: torch.device) -> torch.Tensor:
    """Map a buffer another process shared (its device index replaced by ours)."""
    args = [base64.b64decode(a) if isinstance(a, str) else a for a in shared]
    args[0] = device.index
    storage = torch.UntypedStorage._new_shared_cuda(*args)
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


class IpcTransport(Transport):
    """Rank 0 shares two bucket buffers; engine workers on the same GPU read them."""

    def __init__(self, channel: Channel, device: torch.device):
        super().__init__(channel, device)
        self._key = ""
        self._shared: list[torch.Tensor] = []
        self._shared_desc = ""
        # per buffer, an event this side records when done with it; the peers wait on them on the GPU
        with torch.cuda.device(device):
            self._events = [torch.cuda.Event(interprocess=True) for _ in range(2)]
        self._events_desc = json.dumps([_b64(e.ipc_handle()) for e in self._events])
        self._theirs: list[list[torch.cuda.Event]] = []
        self._opened: dict[str, list[torch.cuda.Event]] = {}
        if channel.rank == 0:
            channel.post("ipc/uuid", _gpu_uuid(device))
            problems = channel.acks("ipc/ready", "every engine worker to check it shares the trainer's GPU")
            if problems:
                raise WeightTransferError("backend='ipc' needs the engine on the trainer's GPU: " + "; ".join(problems))
            return
        theirs, ours = channel.get("ipc/uuid", "the trainer's GPU id"), _gpu_uuid(device)
        ack = Ack(ok=theirs == ours, error=f"trainer on GPU {theirs}, this worker on GPU {ours}; use backend='nccl'")
        channel.post(f"ipc/ready/{channel.rank}", ack)
        if not ack.ok:
            raise WeightTransferError("backend='ipc' needs the engine on the trainer's GPU: " + ack.error)

    def begin_update(self, key: str, buckets: list[Bucket], staging: bool) -> None:
        self._key = key
        if self.channel.rank == 0:
            before = [b.data_ptr() for b in self._staging]
            super().begin_update(key, buckets, staging=True)
            if [b.data_ptr() for b in self._staging] != before or not self._shared_desc:
                self._shared_desc = json.dumps({"buffers": [_share(b) for b in self._staging],
                                                "events": [_b64(e.ipc_handle()) for e in self._events]})
            self.channel.post(f"{key}/ipc", self._shared_desc)
            self._theirs = [self._open_events(r) for r in self.channel.receivers]
            return
        desc = self.channel.get(f"{key}/ipc", "the trainer's IPC buffers")
        if desc != self._shared_desc:
            data = json.loads(desc)
            self._shared = [_open(item, self.device) for item in data["buffers"]]
            self._theirs = [[_open_event(h, self.device) for h in data["events"]]]
            self._shared_desc = desc
        self.channel.post(f"{key}/events/{self.channel.rank}", self._events_desc)

    def _open_events(self, rank: int) -> list[torch.cuda.Event]:
        desc = self.channel.get(f"{self._key}/events/{rank}", f"the IPC events of rank {rank}")
        if desc not in self._opened:
            self._opened[desc] = [_open_event(h, self.device) for h in json.loads(desc)]
        return self._opened[desc]

    def acquire(self, k: int, nbytes: int) -> torch.Tensor:
        stream = torch.cuda.current_stream(self.device)
        if k >= 2:
            self.channel.wait([f"{self._key}/free/{k - 2}/{r}" for r in self.channel.receivers],
                              f"the engine to finish with bucket {k - 2}")
            for events in self._theirs:
                stream.wait_event(events[k % 2])
        return self.staging(k, nbytes)

    def send(self, k: int, data: torch.Tensor) -> None:
        self._events[k % 2].record(torch.cuda.current_stream(self.device))
        self.channel.post(f"{self._key}/ready/{k}", "1")

    def recv(self, k: int, nbytes: int, into: Optional[torch.Tensor]) -> object:
        return nbytes, into

    def wait(self, k: int, pending: object) -> torch.Tensor:
        nbytes, into = pending
        self.channel.wait([f"{self._key}/ready/{k}"], f"bucket {k} from the trainer")
        torch.cuda.current_stream(self.device).wait_event(self._theirs[0][k % 2])
        source = self._shared[k % 2][:nbytes]
        return source if into is None else into.copy_(source, non_blocking=True)

    def release(self, k: int) -> None:
        self._events[k % 2].record(torch.cuda.current_stream(self.device))
        self.channel.post(f"{self._key}/free/{k}/{self.channel.rank}", "1")

    def flush(self) -> None:
        torch.cuda.current_stream(self.device).synchronize()

    def close(self) -> None:
        super().close()
        self._shared = []
