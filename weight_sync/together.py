"""Start both sides of a group (or of one update) at once, so neither waits alone for the other."""

from __future__ import annotations

import threading
from typing import Any, Callable


def run_together(*calls: Callable[[], Any], timeout_s: float | None = None) -> list[Any]:
    """Run the zero-argument callables concurrently (threads); return their results in order.

    The typical pair is the trainer's and the engine's half of `init` or of an
    update. If any raises, the first error (in argument order) is raised after all
    have returned; pass Ray calls as lambdas that `ray.get` them.
    """
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException | None] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s)
        if thread.is_alive():
            raise TimeoutError(f"run_together: a call did not return within {timeout_s}s")
    for error in errors:
        if error is not None:
            raise error
    return results
