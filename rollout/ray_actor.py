"""One rank of one data-parallel replica, as a Ray actor: an in-process LocalEngine in its own process.

The actor is threaded (Ray `max_concurrency`), so a weight update can arrive
while `generate` runs and land between steps as its pause mode says. Ranks of a
tensor-parallel group all run the same calls (SPMD); only rank 0 returns outputs.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Optional

from rollout.async_local import AsyncLocalEngine
from rollout.config import EngineConfig
from rollout.local_engine import LocalEngine
from weight_sync import free_port


class RankActor:
    """Wrapped with `ray.remote` by RayEngine; every method is a remote call."""

    def __init__(self, replica: int, rank: int):
        self.replica = replica
        self.rank = rank
        self.engine: Optional[LocalEngine] = None

    def address(self) -> tuple[str, int]:
        """Where this rank can host a TCP store (its node's address and a free port)."""
        host = socket.gethostbyname(socket.gethostname())
        return host, free_port(host)

    def start(self, config: dict, tensor_parallel: Optional[dict]) -> int:
        """Build the engine (loading the checkpoint); returns its weight version."""
        from worker.parallel import TensorParallelInit

        tp = TensorParallelInit(**tensor_parallel) if tensor_parallel else None
        config = EngineConfig(**{**config, "executor": "local", "data_parallel_size": 1})
        self.engine = LocalEngine(config, tensor_parallel=tp)
        return self.engine.weight_version

    def generate(self, prompts: list, params: list, seeds: list[int]):
        params = [p.model_copy(update={"seed": s}) for p, s in zip(params, seeds)]
        outs = self.engine.generate(prompts, params, use_tqdm=False)
        return outs if self.rank == 0 else None

    def call(self, method: str, *args, **kwargs):
        """Run one engine method by name (sleep, wake_up, load_weights, update_weights, ...)."""
        return getattr(self.engine, method)(*args, **kwargs)

    def weight_version(self) -> int:
        return self.engine.weight_version

    def pid(self) -> int:
        import os

        return os.getpid()


class AsyncRankActor:
    """A replica of `AsyncRolloutEngine(executor="ray")`: an asyncio Ray actor serving one in-process
    AsyncRolloutEngine (tensor_parallel_size 1). Streams are Ray streaming generators; engine calls that block
    run in a thread, so streams keep flowing meanwhile."""

    def __init__(self, replica: int, rank: int):
        self.replica = replica
        self.engine = None

    async def start(self, config: dict, tensor_parallel: Optional[dict]) -> int:

        config = EngineConfig(**{**config, "executor": "local", "data_parallel_size": 1})
        self.engine = await asyncio.to_thread(AsyncLocalEngine, config)
        return self.engine.weight_version

    async def stream(self, prompt: list[int], params, request_id: str, partial, wait: bool):
        """Yield the request's SampleDeltas (a Ray streaming generator)."""
        async for delta in self.engine.generate_stream(prompt, params, request_id, partial=partial, wait=wait):
            yield delta

    async def generate(self, prompt: list[int], params, request_id: str, partial, wait: bool):
        return await self.engine.generate(prompt, params, request_id, partial=partial, wait=wait)

    async def abort(self, request_id: str) -> bool:
        return await self.engine.abort(request_id)

    async def call(self, method: str, *args, **kwargs):
        """Run one LocalEngine method by name in a thread (sleep, load_weights, update_weights, ...)."""

        return await asyncio.to_thread(getattr(self.engine.engine, method), *args, **kwargs)

    async def pid(self) -> int:
        import os

        return os.getpid()
