"""GRPO with Ray: a trainer actor on its own device, the engine's replicas on others, weights synced every step.

    python examples/grpo_ray.py [--steps 20] [--dp 1] [--tp 1] [--cpu]

On GPUs the trainer takes one GPU and each engine rank another, and weights go
over NCCL (in bf16); on a CPU everything runs in local processes over gloo.
Prints, per step: mean reward, and generation / training / sync seconds.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

if "ray" not in sys.modules:  # Ray reads RAY_AUTH_MODE once, when imported
    # token authentication, Ray's own default for a local cluster it starts, stated so that Ray need not warn it
    # chose it (RAY_AUTH_MODE=disabled opts out)
    os.environ.setdefault("RAY_AUTH_MODE", "token")
import ray  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from grpo_common import Trainer, connect, grpo_batch, make_checkpoint, rollout, sync  # noqa: E402

import grpo_common  # noqa: E402
from rollout import RolloutEngine  # noqa: E402

ray.cloudpickle.register_pickle_by_value(grpo_common)  # actors need no copy of examples/ on their path


def main(steps: int = 20, data_parallel_size: int = 1, tensor_parallel_size: int = 1, cpu: bool = False,
         prompts_per_step: int = 8, samples_per_prompt: int = 8, seed: int = 0) -> list[float]:
    """Run GRPO for `steps`; returns the mean reward of each step."""
    if not ray.is_initialized():
        ray.init()
    gpu = not cpu and ray.cluster_resources().get("GPU", 0) > 0
    checkpoint = make_checkpoint(Path(tempfile.mkdtemp(prefix="grpo-")) / "policy", seed)
    trainer = ray.remote(Trainer).options(num_gpus=1 if gpu else 0, num_cpus=1).remote(checkpoint)
    engine = RolloutEngine(model=checkpoint, executor="ray", data_parallel_size=data_parallel_size,
                           tensor_parallel_size=tensor_parallel_size, device="cuda" if gpu else "cpu",
                           kv_cache_memory_bytes=256 << 20, seed=seed)
    connect(trainer, engine, "nccl" if gpu else "gloo")
    rng, rewards = random.Random(seed), []
    try:
        for step in range(steps):
            prompts, outputs, generation = rollout(engine, rng, prompts_per_step, samples_per_prompt)
            batch, mean_reward = grpo_batch(prompts, outputs)
            training = ray.get(trainer.train.remote(batch))["seconds"]
            syncing = sync(trainer, engine, step + 1, "bfloat16" if gpu else None)
            rewards.append(mean_reward)
            print(f"step {step:3d}  reward {mean_reward:.3f}  generate {generation:6.3f}s  train {training:6.3f}s  "
                  f"sync {syncing:6.3f}s  weights v{engine.weight_version}", flush=True)
    finally:
        engine.shutdown()
        ray.kill(trainer)
    return rewards


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dp", type=int, default=1, help="data-parallel engine replicas")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per replica")
    parser.add_argument("--cpu", action="store_true", help="ignore GPUs")
    args = parser.parse_args()
    main(args.steps, args.dp, args.tp, args.cpu)
