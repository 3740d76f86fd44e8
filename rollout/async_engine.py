"""`AsyncRolloutEngine`: the engine as an asyncio service; in this process, or over Ray actors."""

from __future__ import annotations

from typing import Optional

from rollout.async_local import AsyncLocalEngine
from rollout.config import EngineConfig
from rollout.local_engine import engine_config
from rollout.ray_async import AsyncRayEngine
from rollout.ray_engine import RAY_OPTIONS


class AsyncRolloutEngine(AsyncLocalEngine):
    """The engine for asyncio programs: requests come and go at any time (see `AsyncLocalEngine`).

    `AsyncRolloutEngine(EngineConfig(...))` or `AsyncRolloutEngine(model="ckpt_dir", **config_fields)`, the same
    configuration as `RolloutEngine`. With `executor="ray"` it returns an `AsyncRayEngine`: the same calls, each
    request served by one of `data_parallel_size` Ray actors (`placement_group`, `bundle_indices`,
    `num_gpus_per_worker`, `call_timeout_s` configure them, as for `RolloutEngine`).
    """

    def __new__(cls, config: Optional[EngineConfig] = None, **kwargs):
        executor = config.executor if config is not None else kwargs.get("executor", "local")
        if executor == "ray":
            ray_options = {k: kwargs.pop(k) for k in RAY_OPTIONS if k in kwargs}
            return AsyncRayEngine(engine_config(config, kwargs), **ray_options)
        return super().__new__(cls)
