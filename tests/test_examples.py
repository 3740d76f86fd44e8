"""The GRPO examples run on CPU (local Ray cluster, gloo) and their policy learns."""

import importlib.util
import statistics
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("local_ray")
EXAMPLES = Path(__file__).parent.parent / "examples"


def example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rises(rewards):
    return statistics.mean(rewards[-2:]) > statistics.mean(rewards[:2]) + 0.15


def test_grpo_ray_learns_with_two_replicas():
    rewards = example("grpo_ray").main(steps=8, data_parallel_size=2, cpu=True)
    assert len(rewards) == 8 and rises(rewards), rewards


def test_grpo_colocated_learns():
    rewards = example("grpo_colocated").main(steps=8, cpu=True)
    assert len(rewards) == 8 and rises(rewards), rewards
