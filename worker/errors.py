"""Errors raised by the worker (re-exported by `rollout`)."""


class CheckpointError(ValueError):
    """A checkpoint or weight update cannot be used: unreadable files, bad config values, missing, unexpected,
    mis-shaped or non-floating tensors, entries that are not (name, tensor) pairs."""


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture has no model here."""



class EngineSleepingError(RuntimeError):
    """The engine was asked to work while (part of) its memory is asleep."""


class WeightsInvalidError(RuntimeError):
    """Generation was asked for while the weights are not whole (discarded by sleep level 2, or a broken update)."""
