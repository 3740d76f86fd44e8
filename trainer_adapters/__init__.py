"""The trainer's side of weight sync: turn a training model into named tensors and send them."""

from trainer_adapters.sender import WeightSender, sync_weights
from trainer_adapters.tensors import iter_tensors, participate_in_send, tensor_metas, unwrap
from weight_sync import TransferInitInfo, UpdateInfo, WeightTransferError, WeightUpdateRejected, run_together

__all__ = [
    "TransferInitInfo",
    "UpdateInfo",
    "WeightSender",
    "WeightTransferError",
    "WeightUpdateRejected",
    "iter_tensors",
    "participate_in_send",
    "run_together",
    "sync_weights",
    "tensor_metas",
    "unwrap",
]
