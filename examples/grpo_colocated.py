"""GRPO with the trainer and the engine sharing the same GPU (or CPU), handing memory back and forth.

    python examples/grpo_colocated.py [--steps 20] [--cpu]

Each step: the engine generates; sleeps (level 2: weights and KV cache released)
while the trainer steps; wakes its weights, receives the new ones (CUDA IPC on a
GPU, gloo on a CPU); wakes its KV cache. On a GPU, prints per phase the trainer's
peak memory, the engine's mapped arenas and the device's use (on a CPU device
memory is not measured, and it says so once).
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
from ray.util.placement_group import placement_group  # noqa: E402
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from grpo_common import Trainer, connect, grpo_batch, make_checkpoint, rollout, sync  # noqa: E402

import grpo_common  # noqa: E402
from rollout import RolloutEngine  # noqa: E402

ray.cloudpickle.register_pickle_by_value(grpo_common)  # actors need no copy of examples/ on their path

GiB = 2**30


def memory(trainer, engine) -> str:
    report = engine.memory_report()[0]
    arenas = sum(a.mapped_bytes for a in report.arenas.values()) / GiB
    return (f"trainer peak {ray.get(trainer.peak_memory_gib.remote()):5.2f} GiB, engine arenas {arenas:5.2f} GiB, "
            f"device used {report.device_used_bytes / GiB:5.2f} GiB")


def main(steps: int = 20, cpu: bool = False, prompts_per_step: int = 8, samples_per_prompt: int = 8,
         seed: int = 0) -> list[float]:
    """Run colocated GRPO for `steps`; returns the mean reward of each step."""
    if not ray.is_initialized():
        ray.init()
    gpu = not cpu and ray.cluster_resources().get("GPU", 0) > 0
    if not gpu:
        print("device memory is not measured on CPU", flush=True)
    group = placement_group([{"CPU": 2, **({"GPU": 1} if gpu else {})}])
    ray.get(group.ready(), timeout=300)
    share = 0.5 if gpu else 0
    checkpoint = make_checkpoint(Path(tempfile.mkdtemp(prefix="grpo-")) / "policy", seed)
    trainer = ray.remote(Trainer).options(
        num_gpus=share, num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(group, 0)).remote(checkpoint)
    engine = RolloutEngine(model=checkpoint, executor="ray", placement_group=group, bundle_indices=[0],
                           num_gpus_per_worker=share, device="cuda" if gpu else "cpu", enable_sleep_mode=True,
                           kv_cache_memory_bytes=256 << 20, seed=seed)
    connect(trainer, engine, "ipc" if gpu else "gloo")
    rng, rewards = random.Random(seed), []
    try:
        for step in range(steps):
            prompts, outputs, generation = rollout(engine, rng, prompts_per_step, samples_per_prompt)
            after_generate = memory(trainer, engine) if gpu else ""
            engine.sleep(level=2)
            batch, mean_reward = grpo_batch(prompts, outputs)
            training = ray.get(trainer.train.remote(batch))["seconds"]
            ray.get(trainer.free_gpu_memory.remote())
            after_train = memory(trainer, engine) if gpu else ""
            engine.wake_up(["weights"])
            syncing = sync(trainer, engine, step + 1, "bfloat16" if gpu else None)
            engine.wake_up(["kv_cache"])
            after_sync = memory(trainer, engine) if gpu else ""
            rewards.append(mean_reward)
            print(f"step {step:3d}  reward {mean_reward:.3f}  generate {generation:6.3f}s  train {training:6.3f}s  "
                  f"sync {syncing:6.3f}s", flush=True)
            if gpu:
                print(f"    generate: {after_generate}\n    train:    {after_train}\n    sync:     {after_sync}",
                      flush=True)
    finally:
        engine.shutdown()
        ray.kill(trainer)
    return rewards


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpu", action="store_true", help="ignore GPUs")
    args = parser.parse_args()
    main(args.steps, args.cpu)
