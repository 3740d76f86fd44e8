"""Errors raised by the engine for bad requests."""


class InvalidRequestError(ValueError):
    """A prompt or sampling setting the engine cannot serve; nothing was started."""


class ReplicaError(RuntimeError):
    """A data-parallel replica of a Ray engine failed (an actor died or stopped answering)."""


class EnginePausedError(RuntimeError):
    """A request was refused because generation is paused and its caller asked not to wait."""


class EngineClosedError(RuntimeError):
    """The engine was shut down; create a new one."""
