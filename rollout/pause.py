"""Weight updates between generation steps, asked for from any thread.

The engine's lock is held by whoever drives the worker: a `generate()` call or
an update. An update is queued as a job with a pause mode and runs on the
thread that holds the lock, between two steps:

* "wait": after the requests in flight have finished (at the latest when the
  running generate() call ends; a new call runs queued updates first);
* "keep": at the next step; requests in flight continue on the new weights and
  each token records the version that produced it;
* "abort": at the next step, after the requests in flight have been ended with
  finish_reason "abort" (their partial tokens and logprobs are returned).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Optional

PauseMode = Literal["wait", "keep", "abort"]
PAUSE_MODES = ("wait", "keep", "abort")


@dataclass
class _Job:
    run: Callable[[], object]
    mode: PauseMode
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: Optional[BaseException] = None


class UpdateGate:
    """Queue of updates waiting for a step boundary."""

    def __init__(self, lock: threading.Lock):
        self._lock = lock
        self._jobs: deque[_Job] = deque()

    def submit(self, run: Callable[[], object], mode: str) -> object:
        """Run `run` between steps under `mode`; block until it has run and return its result."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause_mode must be one of {', '.join(PAUSE_MODES)}, got {mode!r}")
        job = _Job(run, mode)
        self._jobs.append(job)
        try:
            while not job.done.is_set():
                if self._lock.acquire(blocking=False):  # the engine is idle: run it here
                    try:
                        self.run_pending(PAUSE_MODES)
                    finally:
                        self._lock.release()
                else:
                    job.done.wait(0.002)
        except BaseException:
            if job in self._jobs:  # interrupted before it started: nobody would wait for it
                self._jobs.remove(job)
            raise
        if job.error is not None:
            raise job.error
        return job.result

    def pending(self, modes: Iterable[str]) -> bool:
        return any(job.mode in modes for job in list(self._jobs))

    def run_pending(self, modes: Iterable[str]) -> None:
        """Run the queued jobs of the given modes, in order (the caller holds the lock)."""
        self.run(self.take(modes))

    def take(self, modes: Iterable[str]) -> list[_Job]:
        """Remove and return the queued jobs of the given modes, in order."""
        modes = set(modes)
        jobs = [job for job in list(self._jobs) if job.mode in modes]
        for job in jobs:
            self._jobs.remove(job)
        return jobs

    @staticmethod
    def run(jobs: list[_Job]) -> None:
        """Run taken jobs in order, handing each result or error to its submitter (the caller holds the lock)."""
        for job in jobs:
            try:
                job.result = job.run()
            except BaseException as exc:  # noqa: BLE001 - re-raised on the submitting thread
                job.error = exc
            finally:
                job.done.set()
