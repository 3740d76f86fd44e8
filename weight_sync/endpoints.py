"""The two ends of a group: `Sender` (the trainer, rank 0) and `Receiver` (one engine worker).

One update, both sides counting updates in step:
1. the sender posts the UpdateInfo under `u/<n>/info`;
2. each receiver checks it and answers `u/<n>/ack/<rank>` (accept, or the reason
   it refused, which the sender raises too) before any byte moves;
3. the sender decides under `u/<n>/go`: go if every worker accepted, else called
   off (a worker refused, or the acks did not all come in time); workers that
   accepted wait for it, so a called-off update touches nobody's weights;
4. buckets flow; each receiver answers `u/<n>/done/<rank>` once it has applied them.
A receiver that finds the decision already taken when it reads an announcement
skips it. A sender that cannot prepare its update (e.g. integer tensors)
announces the failure instead, so the receiver raises it too.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from weight_sync.buckets import Bucket, plan_buckets
from weight_sync.errors import WeightTransferError, WeightUpdateRejected
from weight_sync.protocol import Ack, Announcement, TransferInitInfo, UpdateInfo
from weight_sync.join import open_transport
from weight_sync.transport import Apply, Transport, receive_buckets, send_buckets


class Sender:
    """Rank 0 of a group: announces updates and sends their bytes."""

    def __init__(self, info: TransferInitInfo, device: torch.device):
        self.info = info
        self.transport: Transport = open_transport(info, 0, device)
        self.channel = self.transport.channel
        self._updates = 0

    def send(self, update: UpdateInfo, tensors: Iterator[torch.Tensor]) -> None:
        """Announce `update`, and once every worker accepted it, send `tensors` (in its order)."""
        if self.transport.broken:
            raise WeightTransferError(f"this group broke earlier ({self.transport.broken}); join a new one")
        key = self._next_key()
        self.channel.post(f"{key}/info", Announcement(update=update))
        try:
            refused = self.channel.acks(f"{key}/ack", "every engine worker to accept the update")
        except WeightTransferError as exc:
            self.channel.post(f"{key}/go", Ack(ok=False, error=f"the trainer gave up waiting for the acks: {exc}"))
            raise
        if refused:
            reason = f"the engine refused update version {update.version}: " + "; ".join(refused)
            self.channel.post(f"{key}/go", Ack(ok=False, error=reason))
            raise WeightUpdateRejected(reason)
        self.channel.post(f"{key}/go", Ack(ok=True))
        send_buckets(self.transport, key, plan_buckets(update.tensors, update.bucket_bytes), tensors)
        failed = self.channel.acks(f"{key}/done", "every engine worker to apply the update")
        if failed:
            raise WeightTransferError(f"update version {update.version} failed on the engine: " + "; ".join(failed))

    def abandon(self, reason: str) -> None:
        """Tell the engine the next update will not come (the trainer failed to prepare it)."""
        self.channel.post(f"{self._next_key()}/info", Announcement(error=reason))

    def _next_key(self) -> str:
        self._updates += 1
        return f"u/{self._updates - 1}"

    def close(self) -> None:
        self.transport.close()


class Receiver:
    """One engine worker's membership of a group."""

    def __init__(self, info: TransferInitInfo, worker_index: int, device: torch.device):
        self.info = info
        self.transport: Transport = open_transport(info, info.rank_offset + worker_index, device)
        self.channel = self.transport.channel
        self.rank = self.channel.rank
        self._updates = 0
        self._key = ""

    def next_update(self, expected: Optional[UpdateInfo] = None) -> UpdateInfo:
        """Wait for the trainer's next announced update; refuse it if it is not `expected`."""
        if self.transport.broken:
            raise WeightTransferError(f"rank {self.rank}'s weight-transfer group broke in an earlier update "
                                      f"({self.transport.broken}); join a new one with init_weight_transfer")
        while True:
            key = f"u/{self._updates}"
            announced = self.channel.get(f"{key}/info", "the trainer's next update (call send on the trainer)",
                                         Announcement)
            self._updates += 1
            if not self.channel.check(f"{key}/go"):  # already decided: called off before we looked
                break
        self._key = key
        if announced.update is None:
            raise WeightUpdateRejected(f"the trainer gave up on its update before announcing it: {announced.error}")
        update = announced.update
        if self.transport.broken:
            self.refuse(f"rank {self.rank}'s transport broke earlier ({self.transport.broken}); join a new group")
        if expected is not None and expected != update:
            self.refuse(f"the update_info given to the engine (version {expected.version}, {expected.format}, "
                        f"{len(expected.tensors)} tensors) differs from what the trainer sent (version "
                        f"{update.version}, {update.format}, {len(update.tensors)} tensors)")
        return update

    def refuse(self, reason: str) -> None:
        """Tell the trainer why the announced update is refused, and raise it here."""
        self.channel.post(f"{self._key}/ack/{self.rank}", Ack(ok=False, error=reason))
        raise WeightUpdateRejected(reason)

    def receive(self, update: UpdateInfo, apply: Apply,
                direct: Optional[Callable[[Bucket], torch.Tensor]] = None) -> None:
        """Accept the announced update and, once the trainer says go, apply its buckets as they arrive.

        Raises WeightUpdateRejected, having touched nothing, if the trainer calls the
        update off (another worker refused it, or the trainer stopped waiting).
        """
        self.channel.post(f"{self._key}/ack/{self.rank}", Ack(ok=True))
        go = self.channel.get(f"{self._key}/go", "the trainer's go-ahead", Ack)
        if not go.ok:
            raise WeightUpdateRejected(f"the trainer called off update version {update.version}: {go.error}")
        try:
            receive_buckets(self.transport, self._key, plan_buckets(update.tensors, update.bucket_bytes), apply,
                            direct)
        except Exception as exc:
            self._report_done(Ack(ok=False, error=f"{type(exc).__name__}: {exc}"))
            raise
        self._report_done(Ack(ok=True))

    def _report_done(self, ack: Ack) -> None:
        try:
            self.channel.post(f"{self._key}/done/{self.rank}", ack)
        except WeightTransferError:
            if ack.ok:
                raise

    def close(self) -> None:
        self.transport.close()
