"""Which weights are serving: the one owner of the weight version."""

from __future__ import annotations

from typing import Optional

from rollout.block_manager import BlockManager
from worker.updates import requested_version


class ServingWeights:
    """The version of the weights now serving (0: the checkpoint's).

    An update is checked against it (`next_version`), and serving new weights
    (`serve`) starts a new prefix-cache epoch, since cached KV was computed with the
    old ones. The core stamps every token with `version` as it reads it.
    """

    def __init__(self, block_manager: BlockManager):
        self.block_manager = block_manager
        self.version = 0

    def next_version(self, requested: Optional[int]) -> int:
        """The version an update would serve: `requested` (an int newer than `version`) or one more;
        ValueError otherwise."""
        return requested_version(requested, self.version)

    def serve(self, version: int) -> None:
        """Weights of `version` are now in place (ValueError, changing nothing, unless it is newer)."""
        if version <= self.version:
            raise ValueError(f"version {version} is not newer than the serving weight_version {self.version}")
        self.block_manager.reset_prefix_cache()
        self.version = version

    def drop_cache(self) -> None:
        """The KV cache's contents are gone (sleep): nothing cached may be matched again."""
        self.block_manager.reset_prefix_cache()
