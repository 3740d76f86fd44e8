"""Joining a group: the channel first, then the transport its backend names."""

from __future__ import annotations

import torch

from weight_sync.channel import Channel
from weight_sync.ipc import IpcTransport
from weight_sync.nccl import NcclTransport, load_nccl
from weight_sync.protocol import TransferInitInfo
from weight_sync.transport import GlooTransport, Transport


def open_transport(info: TransferInitInfo, rank: int, device: torch.device) -> Transport:
    """Join the group as `rank` (0: the trainer) on `device` and return its transport.

    What this side can check alone (device, libraries) is checked before joining,
    so a rank that cannot take part never leaves the others inside a collective.
    """
    if info.backend != "gloo" and device.type != "cuda":
        raise ValueError(f"backend {info.backend!r} moves weights between GPUs; this side is on {device}. "
                         f"Use backend='gloo' for CPU")
    if info.backend == "nccl":
        load_nccl()
    channel = Channel(info, rank)
    try:
        channel.join()
        if info.backend == "gloo":
            return GlooTransport(channel)
        if info.backend == "nccl":
            return NcclTransport(channel, device)
        return IpcTransport(channel, device)
    except BaseException:
        channel.close()  # the trainer stops listening; nothing of a half-formed group stays open
        raise
