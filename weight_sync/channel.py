"""The control channel of a group: a TCP store hosted by the trainer (rank 0).

It carries the rendezvous and, per update, the handshake: the trainer posts the
UpdateInfo, every engine worker answers with an Ack (accepted or the reason it
refused) before any byte moves, and again when it has applied the update. Every
wait gives up after the group's timeout with a WeightTransferError.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TypeVar

import torch.distributed as dist
from pydantic import BaseModel

from weight_sync.errors import WeightTransferError
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
            store = dist.TCPStore(info.master_address, info.master_port, is_master=rank == 0,
                                  timeout=self.timeout, wait_for_workers=False)
        except Exception as exc:  # noqa: BLE001 - the store raises several kinds
            where = f"{info.master_address}:{info.master_port}"
            what = "listen on" if rank == 0 else "reach the trainer's store at"
            raise WeightTransferError(f"rank {rank} could not {what} {where} within {info.timeout_s}s: {exc}") from exc
        self.raw_store = store
        self.store = dist.PrefixStore(f"{info.group_name}/", store)

    @property
    def receivers(self) -> range:
        """Group ranks of every engine worker."""
        return range(1, self.info.world_size)

    def join(self) -> None:
        """Wait until every rank of the group has arrived."""
        self.store.set(f"joined/{self.rank}", "1")
        self.wait([f"joined/{r}" for r in range(self.info.world_size)], "every rank to join the group")

    def wait(self, keys: list[str], what: str) -> None:
        try:
            self.store.wait(keys, self.timeout)
        except Exception as exc:  # noqa: BLE001
            raise WeightTransferError(f"rank {self.rank} gave up waiting for {what} after "
                                      f"{self.info.timeout_s}s: {exc}") from exc

    def post(self, key: str, message: BaseModel | str) -> None:
        text = message if isinstance(message, str) else message.model_dump_json()
        try:
            self.store.set(key, text)
        except Exception as exc:  # noqa: BLE001
            raise WeightTransferError(f"rank {self.rank} lost the group's store: {exc}") from exc

    def get(self, key: str, what: str, cls: type[M] | None = None) -> M | str:
        self.wait([key], what)
        text = self.store.get(key).decode()
        return text if cls is None else cls.model_validate_json(text)

    def acks(self, key: str, what: str) -> list[str]:
        """Collect every worker's Ack under `key`/<rank>; the reasons of those that refused."""
        answers = [self.get(f"{key}/{r}", what, Ack) for r in self.receivers]
        return [f"rank {r}: {a.error}" for r, a in zip(self.receivers, answers) if not a.ok]
