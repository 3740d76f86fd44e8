"""`AsyncRolloutEngine`: the engine as an asyncio service; in this process, or over Ray actors."""

from __future__ import annotations

from typing import Optional

from rollout.async_local import AsyncLocalEngine
from rollout.config import EngineConfig
from rollout.ray_async import AsyncRayEngine
from rollout.ray_engine import ray_executor


class AsyncRolloutEngine(AsyncLocalEngine):
    """The engine for asyncio programs: requests come and go at any time (see `AsyncLocalEngine`).

    `AsyncRolloutEngine(EngineConfig(...))` or `AsyncRolloutEngine(model="ckpt_dir", **config_fields)`, the same
    configuration as `RolloutEngine`. With `executor="ray"` it returns an `AsyncRayEngine`: the same calls, each
    request served by one of `data_parallel_size` Ray actors (`placement_group`, `bundle_indices`,
    `num_gpus_per_worker`, `call_timeout_s` configure them, as for `RolloutEngine`).
    """

    def __new__(cls, config: Optional[EngineConfig] = None, **kwargs):
        ray = ray_executor(config, kwargs)
        if ray is not None:
            ray_config, ray_options = ray
            return AsyncRayEngine(ray_config, **ray_options)
        return super().__new__(cls)
