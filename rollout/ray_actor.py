"""One rank of one data-parallel replica, as a Ray actor: an in-process LocalEngine in its own process.

The actor is threaded (Ray `max_concurrency`), so a weight update can arrive
while `generate` runs and land between steps as its pause mode says. Ranks of a
tensor-parallel group all run the same calls (SPMD); only rank 0 returns outputs.
"""

from __future__ import annotations

import socket
from typing import Optional

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
