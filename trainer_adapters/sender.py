"""`WeightSender`: the trainer's end of a weight-transfer group."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import torch

from trainer_adapters.tensors import Weights, iter_tensors, tensor_metas
from weight_sync import Sender, TransferInitInfo, UpdateInfo, run_together
from weight_sync.buckets import auto_bucket_bytes


class WeightSender:
    """Joins a group as rank 0 and sends versioned updates to every engine worker in it.

    `WeightSender(init_info)` blocks until the engine has joined too (call
    `engine.init_weight_transfer(init_info)` at the same time). `device`: where
    the bucket buffers live; default the current CUDA device for "nccl" / "ipc",
    the CPU for "gloo".
    """

    def __init__(self, init_info: Union[TransferInitInfo, dict], device: Optional[Union[str, torch.device]] = None):
        info = TransferInitInfo.model_validate(init_info)
        if device is None:
            device = "cpu" if info.backend == "gloo" else f"cuda:{torch.cuda.current_device()}"
        self.init_info = info
        self.device = torch.device(device)
        self._sender = Sender(info, self.device)

    def update_info(
        self,
        weights: Weights,
        version: int,
        format: Literal["checkpoint", "kernel"] = "checkpoint",
        partial: bool = False,
        bucket_bytes: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> UpdateInfo:
        """The UpdateInfo `send` with the same arguments announces (metadata only, nothing gathered)."""
        metas = tensor_metas(weights, dtype)
        return UpdateInfo(version=version, format=format, tensors=metas,
                          bucket_bytes=bucket_bytes or auto_bucket_bytes(metas), partial=partial)

    def send(
        self,
        weights: Weights,
        version: int,
        format: Literal["checkpoint", "kernel"] = "checkpoint",
        partial: bool = False,
        bucket_bytes: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> UpdateInfo:
        """Send `weights` as update `version`; returns when every engine worker has applied it.

        `weights`: an nn.Module (plain, Hugging Face, DDP, FSDP2, compiled), a dict
        or (name, tensor) pairs. "checkpoint" format uses Hugging Face names (what
        the module's `named_parameters` gives); "kernel" the engine's own parameter
        names. `partial=True` sends a subset. `bucket_bytes` (default: an eighth of
        the update, within 256 MiB .. 1 GiB) sets the engine's staging: two buckets
        (each at least the largest tensor). `dtype` casts on the trainer before
        sending (e.g. bfloat16 halves the bytes of an fp32 trainer). Raises
        WeightUpdateRejected if the engine refuses it (nothing moved; the engine
        keeps its weights) and WeightTransferError if the transfer breaks.
        """
        try:
            update = self.update_info(weights, version, format, partial, bucket_bytes, dtype)
        except (ValueError, TypeError) as exc:
            self._sender.abandon(f"{type(exc).__name__}: {exc}")
            raise
        self._sender.send(update, (tensor for _, tensor in iter_tensors(weights, dtype)))
        return update

    def close(self) -> None:
        """Leave the group (the engine must join a new one to receive more updates)."""
        self._sender.close()


def sync_weights(sender: WeightSender, engine: Any, weights: Weights, version: int,
                 pause_mode: str = "wait", **send_options) -> int:
    """Send `weights` from `sender` and receive them on a local `engine` at the same time; returns the version."""
    update = sender.update_info(weights, version, **send_options)
    run_together(lambda: sender.send(weights, version, **send_options),
                 lambda: engine.update_weights(update, pause_mode=pause_mode))
    return version
