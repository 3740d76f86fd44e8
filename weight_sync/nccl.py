"""NCCL broadcast through cupy, on a stream of its own, with a host-side deadline.

The communicator is our own (its id travels over the group's store), so neither
side's default process group is touched. Broadcasts are queued on a side
stream and ordered against packing / applying with CUDA events; the host only
blocks in `flush`, polling for completion and NCCL errors until the group's
timeout, then aborts the communicator so no kernel waits forever.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Optional

import torch

from weight_sync.channel import Channel
from weight_sync.errors import WeightTransferError
from weight_sync.transport import Transport


def load_nccl():
    try:
        from cupy.cuda import nccl
    except ImportError as exc:
        raise ImportError("backend='nccl' needs cupy built with NCCL: pip install 'rollout-engine[cuda12]' "
                          "(or [cuda13])") from exc
    return nccl


def _encode_id(uid) -> str:
    """cupy gives the NCCL unique id as bytes (older versions: a tuple of ints)."""
    if isinstance(uid, bytes):
        return json.dumps({"b64": base64.b64encode(uid).decode()})
    return json.dumps({"ints": list(uid)})


def _decode_id(text: str):
    data = json.loads(text)
    return base64.b64decode(data["b64"]) if "b64" in data else tuple(data["ints"])


class NcclTransport(Transport):
    """Rank 0 broadcasts each bucket to every engine worker."""

    def __init__(self, channel: Channel, device: torch.device):
        super().__init__(channel, device)
        nccl = load_nccl()
        self._nccl = nccl
        if channel.rank == 0:
            channel.post("nccl/id", _encode_id(nccl.get_unique_id()))
        uid = _decode_id(channel.get("nccl/id", "the NCCL id from the trainer"))
        with torch.cuda.device(device):
            self.comm = nccl.NcclCommunicator(channel.info.world_size, uid, channel.rank)
            self.stream = torch.cuda.Stream(device)
        self._sent = [torch.cuda.Event(), torch.cuda.Event()]  # per buffer: its last broadcast
        self._used = [False, False]

    def _broadcast(self, data: torch.Tensor) -> None:
        self._check()
        with torch.cuda.device(self.device):
            self.comm.bcast(data.data_ptr(), data.numel(), self._nccl.NCCL_UINT8, 0, self.stream.cuda_stream)

    def acquire(self, k: int, nbytes: int) -> torch.Tensor:
        if self._used[k % 2]:
            torch.cuda.current_stream(self.device).wait_event(self._sent[k % 2])
        return self.staging(k, nbytes)

    def send(self, k: int, data: torch.Tensor) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._broadcast(data)
        self._sent[k % 2].record(self.stream)
        self._used[k % 2] = True

    def recv(self, k: int, nbytes: int, into: Optional[torch.Tensor]) -> object:
        data = self.staging(k, nbytes) if into is None else into
        # everything queued so far (applying bucket k-1, which used this buffer) comes first
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._broadcast(data)
        arrived = torch.cuda.Event()
        arrived.record(self.stream)
        return data, arrived

    def wait(self, k: int, pending: object) -> torch.Tensor:
        data, arrived = pending
        torch.cuda.current_stream(self.device).wait_event(arrived)
        return data

    def flush(self) -> None:
        done = torch.cuda.Event()
        done.record(self.stream)
        current = torch.cuda.Event()
        current.record(torch.cuda.current_stream(self.device))
        deadline = time.monotonic() + self.channel.info.timeout_s
        while not (done.query() and current.query()):
            try:
                self.comm.check_async_error()
            except Exception as exc:  # noqa: BLE001 - cupy raises NcclError
                self._abort(f"NCCL reported an error: {exc}")
            if time.monotonic() > deadline:
                self._abort(f"the broadcast did not finish within {self.channel.info.timeout_s}s")
            time.sleep(2e-5)
        self._used = [False, False]

    def _abort(self, why: str) -> None:
        self.abort(why)
        raise WeightTransferError(f"rank {self.channel.rank}: {why}; the NCCL group was aborted")

    def abort(self, reason: str) -> None:
        """Abort the communicator, so kernels still queued on its stream end (once)."""
        if not self.broken:
            self.comm.abort()
        super().abort(reason)

    def _check(self) -> None:
        if self.broken:
            raise WeightTransferError(f"this NCCL group broke earlier ({self.broken}); join a new one")

    def close(self) -> None:
        """Leave the group. Aborting is local, unlike ncclCommDestroy, which can block until the peers leave too."""
        super().close()
        self.abort("closed")

    def __del__(self) -> None:
        if getattr(self, "comm", None) is not None:
            self.close()
