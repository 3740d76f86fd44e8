"""Data-parallel scaling: output tokens/s of executor="ray" with 1 and 2 replicas (one GPU each), one run.

    python -m benchmarks.dp_scaling --config benchmarks/models/qwen3-0.6b.json --checkpoint /tmp/q06 --prompts 512

The throughput workload: random prompts of 128 tokens, 256 new tokens each
(ignore_eos), temperature 1, bf16, max_num_seqs 256 per replica; the same prompts
for both sizes (512: one replica runs them in two waves of 256, two replicas in one
wave each); a small warm-up call first, then one timed call.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import ray
import torch

from benchmarks.common import git_commit, model_source
from rollout import RolloutEngine, SamplingParams


def measure(checkpoint: str, replicas: int, prompts: list[list[int]], params: SamplingParams) -> float:
    engine = RolloutEngine(model=checkpoint, executor="ray", data_parallel_size=replicas, dtype="bfloat16",
                           gpu_memory_utilization=0.8, max_model_len=1024, max_num_seqs=256)
    try:
        engine.generate(prompts[: 4 * replicas], params.model_copy(update={"max_tokens": 8}), use_tqdm=False)
        start = time.perf_counter()
        outs = engine.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    finally:
        engine.shutdown()
    return sum(len(s.token_ids) for o in outs for s in o.samples) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args()
    model_source(Path(args.config), Path(args.checkpoint), random_weights=False)
    vocab = json.loads(Path(args.config).read_text())["vocab_size"]
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(128)] for _ in range(args.prompts)]
    params = SamplingParams(temperature=1.0, max_tokens=256, ignore_eos=True)
    ray.init(include_dashboard=False, log_to_driver=False)
    rates = {n: measure(args.checkpoint, n, prompts, params) for n in (1, 2)}
    facts = dict(date=time.strftime("%Y-%m-%d"), gpu=torch.cuda.get_device_name(0), commit=git_commit(),
                 model=Path(args.config).stem, prompts=args.prompts, tok_s=rates, speedup=rates[2] / rates[1])
    print(f"model={facts['model']} gpu={facts['gpu']} commit={facts['commit']} prompts={args.prompts}")
    print(f"{'replicas':>8} {'output tok/s':>13}")
    for n, rate in rates.items():
        print(f"{n:8d} {rate:13.0f}")
    print(f"speedup {facts['speedup']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
