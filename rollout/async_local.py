"""`AsyncLocalEngine`: the engine as an asyncio service in this process (behind `AsyncRolloutEngine`)."""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Iterable, Mapping, Optional, Union

import torch

from rollout.config import EngineConfig, engine_config
from rollout.errors import EngineClosedError
from rollout.local_engine import LocalEngine, Prompt
from rollout.outputs import PartialSample, RolloutOutput, SampleDelta
from rollout.pause import PauseMode, check_pause_mode
from rollout.requests import Request, Sink
from rollout.sampling_params import SamplingParams
from weight_sync import TransferInitInfo, UpdateInfo
from worker.memory.report import MemoryReport


class _Mailbox:
    """Moves results from the engine thread onto one asyncio event loop: one wake-up per batch of them."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, object]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, queue: asyncio.Queue, item: object) -> None:
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the event loop was closed: nobody is listening any more
            pass

    def _flush(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, item in items:
            queue.put_nowait(item)


class _Finished:
    def __init__(self, output: RolloutOutput):
        self.output = output


class _QueueSink(Sink):
    """Puts a request's deltas (when streaming), its output and its error on an asyncio queue."""

    def __init__(self, mailbox: _Mailbox, stream: bool):
        self.mailbox, self.stream = mailbox, stream
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ended = False  # its output or error has been taken off the queue

    def deltas(self, deltas: list[SampleDelta]) -> None:
        self.mailbox.put(self.queue, deltas)

    def finished(self, output: RolloutOutput) -> None:
        self.mailbox.put(self.queue, _Finished(output))

    def failed(self, error: BaseException) -> None:
        self.mailbox.put(self.queue, error)


class AsyncLocalEngine:
    """The engine for asyncio programs: many concurrent `generate` / `generate_stream` calls are batched together
    continuously on the engine loop's thread (the only one that touches the device); nothing here blocks the
    event loop.

    `AsyncRolloutEngine(EngineConfig(...))` or `AsyncRolloutEngine(model="ckpt_dir", **config_fields)`: the same
    configuration as `RolloutEngine`. Building it loads the model (blocking; build it before the event loop's
    busy part, or in `asyncio.to_thread`). Users build it as `AsyncRolloutEngine` (rollout/async_engine.py),
    which also picks the Ray executor.
    """

    def __init__(self, config: Optional[EngineConfig] = None, **kwargs):
        config = engine_config(config, kwargs)
        self.config = config
        self.engine = LocalEngine(config)
        self._mailboxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}
        self._outgoing: list[Request] = []  # made in this event-loop turn, sent together

    @property
    def weight_version(self) -> int:
        """Version of the weights now serving: 0 for the checkpoint's, then each update's."""
        return self.engine.weight_version

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate_stream(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                              request_id: Optional[str] = None, *, partial: Optional[PartialSample] = None,
                              wait: bool = True) -> AsyncIterator[SampleDelta]:
        """Sample completions of one prompt, yielding each sample's new tokens as they come.

        Each `SampleDelta` carries new token ids, their logprobs (and top logprobs) when
        asked for and their weight versions; a sample's last delta carries its
        `finish_reason`. The stream ends when every sample has ended. `request_id`
        (default: a fresh one) names the request for `abort`; ids must be unique among
        the requests in flight. `partial` continues an earlier sample (see
        `PartialSample`): `max_tokens` counts the new tokens. While generation is paused
        or the engine asleep the request waits, or with `wait=False` fails with
        EnginePausedError / EngineSleepingError. Leaving the loop early (break, a
        cancelled task, a client that went away) aborts the request and frees its KV blocks.
        """
        request = self._request(prompt, params, request_id, partial, stream=True, wait=wait)
        try:
            while True:
                item = await self._next(request)
                if isinstance(item, _Finished):
                    return
                for delta in item:
                    yield delta
        finally:
            self._abort_unless_ended(request)  # left early (break, cancelled): end the request now

    async def generate(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None, *, partial: Optional[PartialSample] = None,
                       wait: bool = True) -> RolloutOutput:
        """Sample completions of one prompt and return them all at once (see `generate_stream`); cancelling the
        call aborts the request."""
        request = self._request(prompt, params, request_id, partial, stream=False, wait=wait)
        try:
            return (await self._next(request)).output
        finally:
            self._abort_unless_ended(request)

    def _request(self, prompt, params, request_id, partial, stream: bool, wait: bool) -> Request:
        """A checked request, sent to the engine loop together with the others made in this event-loop turn."""
        front = self.engine.front
        (tokens,), (p,) = front.check([prompt], params, labels=["prompt"])
        request = front.request(tokens, p, _QueueSink(self._mailbox(), stream), request_id, partial)
        request.wait = wait
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._send)
        self._outgoing.append(request)
        return request

    def _send(self) -> None:
        requests, self._outgoing = self._outgoing, []
        if not self.engine.loop.closed:
            self.engine.loop.add(requests)
            return
        for request in requests:
            request.sink.failed(EngineClosedError("the engine was shut down; create a new one"))

    @staticmethod
    async def _next(request: Request):
        """The request's next queue item (deltas or its output); its error is raised."""
        item = await request.sink.queue.get()
        if isinstance(item, (BaseException, _Finished)):
            request.sink.ended = True
        if isinstance(item, BaseException):
            raise item
        return item

    def _abort_unless_ended(self, request: Request) -> None:
        if request in self._outgoing:  # not sent yet: it never will be
            self._outgoing.remove(request)
        elif not request.sink.ended and not self.engine.loop.closed:
            self.engine.loop.abort([request.request_id])

    def _mailbox(self) -> _Mailbox:
        loop = asyncio.get_running_loop()
        mailbox = self._mailboxes.get(loop)
        if mailbox is None:
            for old in [old for old in self._mailboxes if old.is_closed()]:
                del self._mailboxes[old]
            mailbox = self._mailboxes[loop] = _Mailbox(loop)
        return mailbox

    async def abort(self, request_id: str) -> bool:
        """End a request now: its stream ends with finish_reason "abort" and the tokens and logprobs produced so
        far. Returns False (a harmless no-op, logged) when no such request is in flight."""
        return (await asyncio.wrap_future(self.engine.loop.abort([request_id])))[0]

    async def pause_generation(self, mode: PauseMode = "keep") -> None:
        """Stop generating once `mode` allows ("abort": end the requests in flight now; "wait": let them finish;
        "keep": keep them for `resume_generation`). Requests arriving while paused wait."""
        check_pause_mode(mode)
        await asyncio.wrap_future(self.engine.loop.pause(mode))

    async def resume_generation(self) -> None:
        """Generate again; kept and waiting requests continue."""
        await asyncio.wrap_future(self.engine.loop.resume())

    async def load_weights(self, weights: Union[Iterable[tuple[str, torch.Tensor]], Mapping[str, torch.Tensor]],
                           version: Optional[int] = None, pause_mode: PauseMode = "wait") -> int:
        """`RolloutEngine.load_weights`, landing between two steps as `pause_mode` says."""
        return await asyncio.to_thread(self.engine.load_weights, weights, version, pause_mode)

    async def init_weight_transfer(self, init_info: Union[TransferInitInfo, dict],
                                   worker_index: Optional[int] = None) -> None:
        """`RolloutEngine.init_weight_transfer` (joins the trainer's group; generation goes on meanwhile)."""
        await asyncio.to_thread(self.engine.init_weight_transfer, init_info, worker_index)

    async def update_weights(self, update_info: Union[UpdateInfo, dict, None] = None,
                             pause_mode: PauseMode = "wait") -> int:
        """`RolloutEngine.update_weights`: the trainer's next update, landing between two steps."""
        return await asyncio.to_thread(self.engine.update_weights, update_info, pause_mode)

    async def sleep(self, level: int = 1) -> None:
        """`RolloutEngine.sleep`; while paused, kept requests are recomputed after `wake_up`."""
        await asyncio.to_thread(self.engine.sleep, level)

    async def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """`RolloutEngine.wake_up`; requests that waited start once everything is awake."""
        await asyncio.to_thread(self.engine.wake_up, tags)

    def memory_report(self) -> MemoryReport:
        return self.engine.memory_report()

    async def shutdown(self) -> None:
        """End every request in flight (finish_reason "abort"), free the device and stop the engine loop."""
        await asyncio.to_thread(self.engine.shutdown, True)
