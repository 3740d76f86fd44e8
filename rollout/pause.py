"""Work that lands between two generation steps, asked for from any thread, with a pause mode.

An update (or pause, sleep, export) is queued as a `Job` and run by the engine
loop's thread between two steps. Its pause mode says what happens to the
requests in flight:

* "wait": it runs once the requests in flight have finished; requests that
  arrive meanwhile are held back until it has run;
* "keep": it runs at the next step boundary; requests in flight continue on the
  new weights, and each token records the version that produced it;
* "abort": at the next step boundary, the requests in flight end first with
  finish_reason "abort" (their partial tokens and logprobs are returned).

While generation is paused, every job runs at once (the pause already decided
what happens to the requests in flight).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Literal

PauseMode = Literal["wait", "keep", "abort"]
PAUSE_MODES = ("wait", "keep", "abort")


def check_pause_mode(mode: object) -> None:
    if mode not in PAUSE_MODES:
        raise ValueError(f"pause_mode must be one of {', '.join(PAUSE_MODES)}, got {mode!r}")


@dataclass
class Job:
    """`run` to call on the engine thread under `mode`; its result or error goes to `future`."""

    run: Callable[[], object]
    mode: PauseMode
    future: Future = field(default_factory=Future)

    def __call__(self) -> None:
        if not self.future.set_running_or_notify_cancel():  # its submitter gave up before it started
            return
        try:
            self.future.set_result(self.run())
        except BaseException as exc:  # noqa: BLE001 - re-raised on the submitting thread
            self.future.set_exception(exc)
