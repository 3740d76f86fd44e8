"""`RolloutEngine`: the engine users build; in this process, or over Ray actors with `executor="ray"`."""

from __future__ import annotations

from typing import Optional

from rollout.config import EngineConfig
from rollout.local_engine import LocalEngine
from rollout.ray_engine import RayEngine, ray_executor


class RolloutEngine(LocalEngine):
    """Generates samples with exact per-token logprobs from a Hugging Face checkpoint.

    `RolloutEngine(EngineConfig(...))` or `RolloutEngine(model="ckpt_dir", **config_fields)`.
    With `executor="ray"` it returns a `RayEngine` (the same calls, served by Ray actors;
    `placement_group`, `bundle_indices`, `num_gpus_per_worker`, `call_timeout_s` configure it).
    With `tensor_parallel_size` > 1 and no Ray, one engine runs in each rank's process, each
    given its `tensor_parallel` (rank, size, rendezvous).
    """

    def __new__(cls, config: Optional[EngineConfig] = None, **kwargs):
        ray = ray_executor(config, kwargs)
        if ray is not None:
            ray_config, ray_options = ray
            return RayEngine(ray_config, **ray_options)
        return super().__new__(cls)
