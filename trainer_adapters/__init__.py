"""The trainer's side: turn a training model into named tensors and send them; replay the sampler's MoE routing."""

from trainer_adapters.routing import moe_routers, replay_routing
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
    "moe_routers",
    "participate_in_send",
    "replay_routing",
    "run_together",
    "sync_weights",
    "tensor_metas",
    "unwrap",
]
