"""Errors raised by the worker (re-exported by `rollout`)."""


class CheckpointError(ValueError):
    """A checkpoint or weight update does not fit the model: missing, unexpected or mis-shaped tensors."""


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture has no model here."""

