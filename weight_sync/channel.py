"""The control channel of a group: the trainer-hosted group store (see group_store.py).

It carries the rendezvous and, per update, the handshake: the trainer posts the
UpdateInfo, every engine worker answers with an Ack (accepted or the reason it
refused) before any byte moves, and again when it has applied the update. Every
wait gives up after the group's timeout with a WeightTransferError that says
what was awaited, for how long, and whether it timed out or the other side went
away. Only members holding the group's secret get in.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import TypeVar

import torch.distributed as dist
from pydantic import BaseModel

from weight_sync.errors import WeightTransferError
from weight_sync.group_store import GroupStore, StoreError, StoreTimeout
from weight_sync.protocol import Ack, TransferInitInfo

M = TypeVar("M", bound=BaseModel)


class Channel:
    """Keyed JSON messages between the ranks of one group."""

    def __init__(self, info: TransferInitInfo, rank: int):
        if not 0 <= rank < info.world_size:
            raise ValueError(f"rank {rank} is outside the group of world_size={info.world_size}")
        self.info = info
        self.rank = rank
        self.timeout = timedelta(seconds=info.timeout_s)
        try:
            self.group_store = GroupStore(info.master_address, info.master_port, info.secret.get_secret_value(),
                                          rank, self.timeout, is_host=rank == 0)
        except StoreError as exc:
            raise WeightTransferError(f"rank {rank} could not join the weight-transfer group: {exc}") from None
        self.store = dist.PrefixStore(f"{info.group_name}/", self.group_store)

    @property
    def receivers(self) -> range:
        """Group ranks of every engine worker."""
        return range(1, self.info.world_size)

    def join(self) -> None:
        """Wait until every rank of the group has arrived."""
        try:
            self.group_store.meet(self.info.world_size, f"weight-transfer group {self.info.group_name!r}")
        except StoreError as exc:
            raise WeightTransferError(f"rank {self.rank}: {exc}") from None

    def wait(self, keys: list[str], what: str) -> None:
        start = time.monotonic()
        try:
            self.store.wait(keys, self.timeout)
        except StoreTimeout:
            raise WeightTransferError(f"rank {self.rank} gave up waiting for {what} after {self.info.timeout_s:g}s "
                                      f"(the group's timeout_s)") from None
        except StoreError as exc:
            raise WeightTransferError(f"rank {self.rank} lost the group after {time.monotonic() - start:.1f}s of "
                                      f"waiting for {what}: {exc}") from None

    def post(self, key: str, message: BaseModel | str) -> None:
        text = message if isinstance(message, str) else message.model_dump_json()
        try:
            self.store.set(key, text)
        except StoreError as exc:
            raise WeightTransferError(f"rank {self.rank} could not post {key!r}: {exc}") from None

    def check(self, key: str) -> bool:
        """Whether `key` has been posted (without waiting)."""
        try:
            return self.store.check([key])
        except StoreError as exc:
            raise WeightTransferError(f"rank {self.rank} lost the group: {exc}") from None

    def get(self, key: str, what: str, cls: type[M] | None = None) -> M | str:
        self.wait([key], what)
        try:
            text = self.store.get(key).decode()
        except StoreError as exc:
            raise WeightTransferError(f"rank {self.rank} lost the group: {exc}") from None
        return text if cls is None else cls.model_validate_json(text)

    def acks(self, key: str, what: str) -> list[str]:
        """Collect every worker's Ack under `key`/<rank>; the reasons of those that refused."""
        answers = [self.get(f"{key}/{r}", what, Ack) for r in self.receivers]
        return [f"rank {r}: {a.error}" for r, a in zip(self.receivers, answers) if not a.ok]

    def close(self) -> None:
        """Leave the group's store (on the trainer: stop serving it, so waiting members learn at once)."""
        self.group_store.close()
