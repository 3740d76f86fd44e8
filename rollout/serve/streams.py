"""Running several engine requests for one HTTP request (merged streams), server-sent events, and incremental
detokenization."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from rollout.outputs import PartialSample, RolloutOutput, SampleDelta
from rollout.serve.errors import ClientGone
from rollout.sampling_params import SamplingParams

NO_LOGPROB = -9999.0  # JSON has no -inf (a token the filters ruled out); OpenAI servers send this instead


def finite(value: Optional[float]) -> Optional[float]:
    return NO_LOGPROB if value is not None and math.isinf(value) and value < 0 else value


def sse(payload) -> str:
    """One server-sent event holding `payload` as JSON (or the literal [DONE])."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, allow_nan=False)}\n\n"


@dataclass
class Job:
    """One engine request of an HTTP request: `group` is the HTTP request's id (what /abort_request names)."""

    prompt: list[int]
    params: SamplingParams
    rid: str
    group: str
    partial: Optional[PartialSample] = None


async def generate_all(engine, server, jobs: list[Job]) -> list[RolloutOutput]:
    """`engine.generate` of each job at once; the first error cancels the others (which aborts them) and is
    raised."""
    if len(jobs) == 1:  # the common case, without a task of its own
        job = jobs[0]
        return [await _tracked(server, job, engine.generate(job.prompt, job.params, job.rid, partial=job.partial))]
    tasks = [asyncio.ensure_future(_tracked(server, job, engine.generate(job.prompt, job.params, job.rid,
                                                                         partial=job.partial)))
             for job in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def unless_client_leaves(receive, awaitable):
    """`await awaitable`, cancelled (which aborts its engine requests) if the client disconnects first; `receive`
    is the request's ASGI receive (its body already read)."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_cancel_on_disconnect(receive, work))
    try:
        return await work
    except asyncio.CancelledError:
        if watch.done() and not watch.cancelled():  # the client left: its work was cancelled, aborting it
            raise ClientGone() from None
        raise
    finally:
        watch.cancel()


async def _cancel_on_disconnect(receive, work: asyncio.Future) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    work.cancel()


async def _tracked(server, job: Job, awaitable):
    server.in_flight[job.rid] = job.group
    server.requests_total += 1
    try:
        output = await awaitable
        earlier = len(job.partial.token_ids) if job.partial is not None else 0  # the output repeats them
        server.generated_tokens_total += sum(len(sample.token_ids) for sample in output.samples) - earlier
        return output
    finally:
        server.in_flight.pop(job.rid, None)


class MergedStreams:
    """`engine.generate_stream` of each job at once, their deltas as (job index, delta) in arrival order.

    `await start()` returns once the first delta has come, raising the error of a request the engine refused
    (so the route can still answer 4xx); `close()` cancels the streams still running, which aborts them.
    """

    def __init__(self, engine, server, jobs: list[Job]):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.remaining = len(jobs)
        self.tasks = [asyncio.ensure_future(self._pump(i, server, engine, job)) for i, job in enumerate(jobs)]
        self.first = None

    async def _pump(self, i: int, server, engine, job: Job) -> None:
        server.in_flight[job.rid] = job.group
        server.requests_total += 1
        try:
            async for delta in engine.generate_stream(job.prompt, job.params, job.rid, partial=job.partial):
                server.generated_tokens_total += len(delta.token_ids)
                self.queue.put_nowait((i, delta))
        except Exception as exc:  # handed to the reader, which raises it
            self.queue.put_nowait((i, exc))
        finally:
            server.in_flight.pop(job.rid, None)
            self.queue.put_nowait((i, None))

    async def start(self) -> None:
        self.first = await self._get()

    async def _get(self):
        item = await self.queue.get()
        if isinstance(item[1], Exception):
            self.close()
            raise item[1]
        return item

    async def __aiter__(self) -> AsyncIterator[tuple[int, SampleDelta]]:
        try:
            item = self.first if self.first is not None else await self._get()
            while True:
                if item[1] is None:
                    self.remaining -= 1
                    if self.remaining == 0:
                        return
                else:
                    yield item
                item = await self._get()
        finally:
            self.close()

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()


class Detokenizer:
    """Text of a growing token list, piece by piece: a piece is held back while it ends in an incomplete
    character; `finish()` returns what is left so that the pieces add up to the decode of all the tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # decode ids[prefix:] and drop the text of ids[prefix:read]
        self.emitted = ""

    def add(self, token_ids: list[int]) -> str:
        if self.tokenizer is None or not token_ids:
            return ""
        self.ids += token_ids
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        text = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(text) <= len(before) or text.endswith("\ufffd") or not text.startswith(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return self._emit(text[len(before):])

    def finish(self) -> str:
        if self.tokenizer is None:
            return ""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._emit(full[len(self.emitted):]) if full.startswith(self.emitted) else ""

    def _emit(self, piece: str) -> str:
        self.emitted += piece
        return piece
