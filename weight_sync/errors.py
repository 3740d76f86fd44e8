"""Errors of a weight transfer, raised on both sides."""


class WeightUpdateRejected(ValueError):
    """The engine refused an update before any byte moved (names, shapes, dtypes, version or format).

    The old weights keep serving. The sender raises it too, with the engine's reason.
    """


class WeightTransferError(RuntimeError):
    """A transfer broke or timed out (peer gone, collective failed).

    On the engine the weights it may have touched are marked invalid: generation
    is refused until a complete update arrives. The group is unusable afterwards;
    join a new one with `init_weight_transfer`.
    """
