import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import save_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """Factory: a saved random checkpoint per (variant, seed), built once per session."""
    cache = {}

    def get(variant: str = "qwen3", seed: int = 0) -> Path:
        key = (variant, seed)
        if key not in cache:
            cache[key] = save_checkpoint(tmp_path_factory.mktemp(f"{variant}-{seed}"), variant, seed)
        return cache[key]

    return get
