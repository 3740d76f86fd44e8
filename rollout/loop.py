"""The engine loop: the one thread that drives the core and touches the device.

Other threads talk to it through its inbox (`add`, `abort`, `job`, `resume`,
`close`); it answers through each request's `Sink` and each job's future. One
turn of the loop reads the inbox, runs the jobs whose time has come (see
rollout/pause.py), then runs one step of the core and delivers what progressed.
The decode round the core leaves on the device is a local of the loop, passed
from one step to the next.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Optional

from rollout.core import EngineCore, Launched, Progress
from rollout.errors import EngineClosedError, EnginePausedError, InvalidRequestError
from rollout.pause import Job, PauseMode, check_pause_mode
from rollout.requests import Request, rollout_output, sample_delta
from worker.errors import EngineSleepingError

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    """Steps the loop ran and their wall time (a step that reads a decode round waits for it: the sum over steps
    is the time spent generating). Written by the engine thread only; read anywhere as a snapshot."""

    steps: int = 0
    seconds: float = 0.0
    last_seconds: float = 0.0


class EngineLoop:
    """Runs an `EngineCore` on its own thread; every method here may be called from any thread."""

    def __init__(self, core: EngineCore, tokenizer=None):
        self.core = core
        self.worker = core.worker
        self.tokenizer = tokenizer
        self.paused = False
        self.stats = StepStats()
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._requests: dict[str, Request] = {}  # every request not yet ended, by id
        self._held: deque[Request] = deque()  # waiting for a pause, a sleep or a "wait" job to end
        self._jobs: deque[Job] = deque()
        self._closed = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="rollout-engine-loop", daemon=True)
        self._thread.start()

    # ---- called from any thread ----

    def add(self, requests: list[Request]) -> None:
        """Queue requests (started together); results go to their sinks. While generation is paused or the engine
        asleep they wait, or (`Request.wait` False) are refused with EnginePausedError / EngineSleepingError."""
        self._post(lambda: self._add(requests))

    def abort(self, request_ids: list[str]) -> Future:
        """End these requests now (finish_reason "abort"); the future gives, per id, whether it was in flight."""
        future: Future = Future()
        self._post(lambda: future.set_result([self._abort(rid) for rid in request_ids]))
        return future

    def job(self, run: Callable[[], object], mode: PauseMode) -> Future:
        """Run `run` on the engine thread between two steps under pause `mode`; the future gets its result."""
        check_pause_mode(mode)
        job = Job(run, mode)
        self._post(lambda: self._jobs.append(job))
        return job.future

    def pause(self, mode: PauseMode) -> Future:
        """Stop stepping once `mode` allows (see rollout/pause.py); requests arriving meanwhile wait."""
        return self.job(self._pause, mode)

    def resume(self) -> Future:
        """Step again, starting the requests that waited."""
        future: Future = Future()
        self._post(lambda: future.set_result(self._resume()))
        return future

    def close(self) -> None:
        """Stop the thread once the queued commands ran; requests still in flight fail with EngineClosedError."""
        if not self._closed:
            self._post(self._stop)
            self._closed = True
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def pending_commands(self) -> int:
        """Commands posted but not yet read, plus jobs waiting for their time (a snapshot)."""
        return self._inbox.qsize() + len(self._jobs)

    @property
    def closed(self) -> bool:
        return self._closed

    def _post(self, command: Callable[[], None]) -> None:
        if self._closed:
            raise EngineClosedError("the engine was shut down; create a new one")
        self._inbox.put(command)

    # ---- the engine thread ----

    def _run(self) -> None:
        self.worker.bind_thread()
        queued: Optional[Launched] = None
        while not self._stopping:
            self._read_inbox(block=queued is None and not self._can_step() and not self._runnable_jobs(queued))
            queued = self._run_jobs(queued)
            if self._can_step():
                queued = self._step(queued)
            elif queued is not None:
                self._deliver(self.core.drain(queued))
                queued = None
        self._fail_all(EngineClosedError("the engine was shut down while this request was in flight"))

    def _read_inbox(self, block: bool) -> None:
        try:
            command = self._inbox.get(block=block)
        except queue.Empty:
            return
        while True:
            command()
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _can_step(self) -> bool:
        return not self.paused and self.core.has_work() and not self.worker.pool.asleep()

    def _step(self, queued: Optional[Launched]) -> Optional[Launched]:
        start = time.perf_counter()
        try:
            queued, progress = self.core.step(queued)
        except Exception as exc:  # noqa: BLE001 - handed to the requests it broke; the engine keeps serving
            log.exception("a generation step failed; its requests get the error")
            dropped = self.core.fail(queued)
            for rid in {seq.request_id for seq in dropped}:
                self._end(rid).sink.failed(exc)
            return None
        took = time.perf_counter() - start
        self.stats.steps, self.stats.seconds, self.stats.last_seconds = self.stats.steps + 1, self.stats.seconds + took, took
        self._deliver(progress)
        return queued

    def _deliver(self, progress: list[Progress]) -> None:
        by_request: dict[str, list[Progress]] = {}
        for item in progress:
            by_request.setdefault(item.seq.request_id, []).append(item)
        for rid, items in by_request.items():
            request = self._requests[rid]
            if request.sink.stream:
                request.sink.deltas([sample_delta(item.seq, item.start) for item in items])
            request.num_running -= sum(item.seq.finished for item in items)
            if request.num_running == 0:
                self._end(rid).sink.finished(rollout_output(request, self.tokenizer, self.core.serving.version))

    def _end(self, request_id: str) -> Request:
        return self._requests.pop(request_id)

    def _add(self, requests: list[Request]) -> None:
        for request in requests:
            if request.request_id in self._requests:
                request.sink.failed(InvalidRequestError(
                    f"request_id {request.request_id!r} is already in flight; request ids must be unique among "
                    f"the requests in flight"))
                continue
            self._requests[request.request_id] = request
            if self._holding():
                self._hold(request)
            else:
                self._start(request)

    def _holding(self) -> bool:
        """Whether new requests must wait: paused, asleep, or a "wait" job waits for the requests in flight."""
        return self.paused or bool(self.worker.pool.asleep()) or any(job.mode == "wait" for job in self._jobs)

    def _hold(self, request: Request) -> None:
        if request.wait or not (self.paused or self.worker.pool.asleep()):
            self._held.append(request)
            return
        self._end(request.request_id)
        if self.paused:
            request.sink.failed(EnginePausedError("generation is paused (pause_generation); call "
                                                  "resume_generation() first, or let the request wait"))
        else:
            request.sink.failed(EngineSleepingError(
                f"the engine is asleep ({', '.join(sorted(self.worker.pool.asleep()))}); call wake_up() first"))

    def _start(self, request: Request) -> None:
        try:
            self.worker.check_ready()
        except Exception as exc:  # noqa: BLE001 - weights not whole: the request is refused, with the reason
            self._end(request.request_id).sink.failed(exc)
            return
        request.seqs = self.core.add_request(request.request_id, request.prompt, request.params, request.seed,
                                             request.continuation)
        request.num_running = len(request.seqs)

    def _release_held(self) -> None:
        while self._held and not self._holding():
            self._start(self._held.popleft())

    def _abort(self, request_id: str) -> bool:
        request = self._requests.get(request_id)
        if request is None:
            log.info("abort(%r): no such request in flight (unknown, or already finished)", request_id)
            return False
        if request in self._held:
            self._held.remove(request)
            request.seqs = self.core.add_request(request.request_id, request.prompt, request.params,
                                                 request.seed, request.continuation)
            request.num_running = len(request.seqs)
        self._deliver(self.core.abort_request(request.seqs))
        return True

    def _runnable_jobs(self, queued: Optional[Launched]) -> list[Job]:
        """Jobs whose time has come: all of them while paused or asleep (nothing in flight can progress), else
        "keep" and "abort" ones, and "wait" ones once nothing is in flight."""
        idle = queued is None and not self.core.has_work()
        stalled = self.paused or bool(self.worker.pool.asleep())
        return [job for job in self._jobs if stalled or job.mode != "wait" or idle]

    def _run_jobs(self, queued: Optional[Launched]) -> Optional[Launched]:
        """Run the jobs whose time has come; a round still on the device is read first (it computes with the
        weights it started with)."""
        jobs = self._runnable_jobs(queued)
        if not jobs:
            return queued
        self._deliver(self.core.drain(queued))
        if any(job.mode == "abort" for job in jobs) and not self.paused:
            self._deliver(self.core.abort_all())
        for job in jobs:
            self._jobs.remove(job)
            job()
        if self.worker.missing_weights:  # an update broke: the requests end with what they have
            self._deliver(self.core.abort_all())
        self._release_held()
        return None

    def end_all(self) -> None:
        """On the engine thread (inside a job): end every request in flight or held, finish_reason "abort"."""
        for rid in list(self._requests):
            self._abort(rid)

    def _pause(self) -> None:
        self.paused = True

    def _resume(self) -> bool:
        was, self.paused = self.paused, False
        self._release_held()
        return was

    def _stop(self) -> None:
        self._stopping = True

    def _fail_all(self, error: BaseException) -> None:
        """After the stop: run what was posted meanwhile, then fail every job and request left."""
        self._closed = True
        self._read_inbox(block=False)
        self.core.fail(None)
        for job in self._jobs:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)
        self._jobs.clear()
        self._held.clear()
        for rid in list(self._requests):
            self._end(rid).sink.failed(error)
