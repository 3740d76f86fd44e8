import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import triton_interpreter  # noqa: E402,F401  (before anything imports triton)

from checkpoints import save_checkpoint  # noqa: E402
from sync_helpers import engine_for, greedy  # noqa: E402
from trainer_process import TrainerProcess  # noqa: E402


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


@pytest.fixture(scope="session")
def trainer():
    """A trainer process (see trainer_process.py), shared by the weight-sync tests."""
    process = TrainerProcess()
    yield process
    process.close()


@pytest.fixture(scope="session")
def old_and_new(checkpoint_dir):
    """Engine checkpoint (seed 0), trainer checkpoint (seed 1), and greedy outputs of fresh engines on each."""
    old, new = checkpoint_dir("qwen3", 0), checkpoint_dir("qwen3", 1)
    expected_old, expected_new = greedy(engine_for(old)), greedy(engine_for(new))
    assert expected_old != expected_new
    return old, new, expected_old, expected_new


if "ray" not in sys.modules:  # Ray reads RAY_AUTH_MODE once, when imported (test modules import it at collection)
    # token authentication, Ray's own default for the local clusters below, stated so that Ray need not warn it chose it
    os.environ.setdefault("RAY_AUTH_MODE", "token")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster for one test module (8 logical CPUs, so several actors fit on a small machine)."""
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def text_checkpoint(tmp_path_factory):
    """A tiny random Qwen3 with a tokenizer and a ChatML chat template (tests/serve_helpers.py)."""
    from serve_helpers import save_text_checkpoint

    return save_text_checkpoint(tmp_path_factory.mktemp("text-ckpt"))
