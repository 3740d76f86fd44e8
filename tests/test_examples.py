"""The GRPO examples run on CPU (local Ray cluster, gloo), their policy learns, and they print only their own lines."""

import importlib.util
import os
import statistics
import subprocess
import sys
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


def test_example_script_prints_no_noise():
    """Run as a user would (its own Ray cluster, actors' output shown): no transformers progress bars, no warning
    from Ray about token authentication, no device-memory lines on CPU (where memory is not measured)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    run = subprocess.run([sys.executable, str(EXAMPLES / "grpo_colocated.py"), "--cpu", "--steps", "1"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    for noise in ("Writing model shards", "Loading weights", "Token authentication", "GiB"):
        assert noise not in run.stdout + run.stderr, (noise, run.stdout, run.stderr)
    assert run.stdout.splitlines()[0] == "device memory is not measured on CPU"
    assert run.stdout.splitlines()[1].startswith("step   0  reward ")
