"""Wire protocol and transports for moving weights from a trainer to the engine (imports no other package of ours)."""

from weight_sync.buckets import Bucket, Slot, flat_offsets, plan_buckets
from weight_sync.endpoints import Receiver, Sender
from weight_sync.errors import WeightTransferError, WeightUpdateRejected
from weight_sync.protocol import TensorMeta, TransferInitInfo, UpdateInfo, free_port, new_secret
from weight_sync.together import run_together

__all__ = [
    "Bucket",
    "Receiver",
    "Sender",
    "Slot",
    "TensorMeta",
    "TransferInitInfo",
    "UpdateInfo",
    "WeightTransferError",
    "WeightUpdateRejected",
    "flat_offsets",
    "free_port",
    "new_secret",
    "plan_buckets",
    "run_together",
]
