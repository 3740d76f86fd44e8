"""`AsyncRolloutEngine(executor="ray")`: data-parallel replicas, each an asyncio Ray actor serving one engine.

Requests are checked and given ids and seeds here (so outputs do not depend on
the replica), then each goes to the least loaded replica serving the current
weights; its deltas come back as a Ray streaming generator. Every other call
fans out to every replica, as `RayEngine` does.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Optional

from rollout.config import EngineConfig
from rollout.errors import InvalidRequestError
from rollout.outputs import PartialSample, RolloutOutput, SampleDelta
from rollout.pause import PauseMode, check_pause_mode
from rollout.ray_actor import AsyncRankActor
from rollout.ray_engine import RayEngine
from rollout.requests import Sink
from rollout.sampling_params import SamplingParams


class AsyncRayEngine:
    """The calls of `AsyncRolloutEngine`, served by `data_parallel_size` asyncio Ray actors."""

    def __init__(self, config: EngineConfig, **ray_options):
        if config.tensor_parallel_size > 1:
            raise ValueError("AsyncRolloutEngine(executor='ray') serves tensor_parallel_size=1 replicas (scale "
                             "with data_parallel_size); for tensor parallelism use RolloutEngine(executor='ray')")
        self.config = config
        self.ray = RayEngine(config, actor_class=AsyncRankActor, **ray_options)
        self.front = self.ray.front
        self._where: dict[str, int] = {}  # request id in flight -> its replica

    @property
    def weight_version(self) -> int:
        return self.ray.weight_version

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (None when it ships none), as `AsyncLocalEngine.tokenizer`."""
        return self.front.tokenizer

    def _place(self, prompt, params: Optional[SamplingParams], request_id: Optional[str], partial):
        (tokens,), (p,) = self.front.check([prompt], params, labels=["prompt"])
        if partial is not None:
            partial = PartialSample.model_validate(partial)
        checked = self.front.request(tokens, p, Sink(), request_id, partial)  # id, seed, partial: checked here
        rid = checked.request_id
        if rid in self._where:
            raise InvalidRequestError(f"request_id {rid!r} is already in flight; request ids must be unique among "
                                      f"the requests in flight")
        p = p.model_copy(update={"seed": checked.seed})
        replica = self.ray.assign_one(tokens, p)
        self._where[rid] = replica
        return tokens, p, rid, partial, replica

    def _done(self, rid: str, tokens, params) -> None:
        self.ray.release_one(self._where.pop(rid), tokens, params)

    async def generate_stream(self, prompt, params: Optional[SamplingParams] = None,
                              request_id: Optional[str] = None, *, partial: Optional[PartialSample] = None,
                              wait: bool = True) -> AsyncIterator[SampleDelta]:
        """See `AsyncRolloutEngine.generate_stream`."""
        tokens, p, rid, partial, replica = self._place(prompt, params, request_id, partial)
        actor = self.ray.replicas[replica][0]
        ended = False
        try:
            stream = actor.stream.options(num_returns="streaming").remote(tokens, p, rid, partial, wait)
            async for ref in stream:
                yield await self._get(replica, ref)
            ended = True
        finally:
            if not ended:
                actor.abort.remote(rid)
            self._done(rid, tokens, p)

    async def generate(self, prompt, params: Optional[SamplingParams] = None, request_id: Optional[str] = None,
                       *, partial: Optional[PartialSample] = None, wait: bool = True) -> RolloutOutput:
        """See `AsyncRolloutEngine.generate`."""
        tokens, p, rid, partial, replica = self._place(prompt, params, request_id, partial)
        actor = self.ray.replicas[replica][0]
        ended = False
        try:
            output = await self._get(replica, actor.generate.remote(tokens, p, rid, partial, wait))
            ended = True
            return output
        finally:
            if not ended:
                actor.abort.remote(rid)
            self._done(rid, tokens, p)

    async def _get(self, replica: int, ref):
        """Await a Ray result; an actor's error is raised as itself, a dead actor as a ReplicaError."""
        try:
            return await ref
        except Exception as exc:  # noqa: BLE001 - translated (or re-raised) by RayEngine.failed
            self.ray.failed(replica, exc)
            raise

    async def abort(self, request_id: str) -> bool:
        """See `AsyncRolloutEngine.abort`."""
        replica = self._where.get(request_id)
        if replica is None:
            return False
        return await self._get(replica, self.ray.replicas[replica][0].abort.remote(request_id))

    async def pause_generation(self, mode: PauseMode = "keep") -> None:
        check_pause_mode(mode)
        await asyncio.to_thread(self.ray.fan_out, "pause_generation", mode)

    async def resume_generation(self) -> None:
        await asyncio.to_thread(self.ray.fan_out, "resume_generation")

    async def load_weights(self, weights, version: Optional[int] = None, pause_mode: PauseMode = "wait") -> int:
        return await asyncio.to_thread(self.ray.load_weights, weights, version, pause_mode)

    async def init_weight_transfer(self, init_info) -> None:
        await asyncio.to_thread(self.ray.init_weight_transfer, init_info)

    async def update_weights(self, update_info=None, pause_mode: PauseMode = "wait") -> int:
        return await asyncio.to_thread(self.ray.update_weights, update_info, pause_mode)

    async def sleep(self, level: int = 1) -> None:
        await asyncio.to_thread(self.ray.sleep, level)

    async def wake_up(self, tags: Optional[list[str]] = None) -> None:
        await asyncio.to_thread(self.ray.wake_up, tags)

    def memory_report(self) -> list:
        return self.ray.memory_report()

    async def shutdown(self) -> None:
        """End every request in flight (finish_reason "abort") and stop the actors."""
        await asyncio.to_thread(self.ray.fan_out, "shutdown", True)
        await asyncio.to_thread(self.ray.shutdown)
