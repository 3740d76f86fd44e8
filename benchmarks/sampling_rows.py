"""Sampling settings side by side on one GRPO-shaped batch (issue 14).

    python -m benchmarks.sampling_rows --config benchmarks/models/qwen3-0.6b.json --checkpoint /tmp/q06

One engine (bf16) runs --prompts (64) random prompts of --input-len (512) tokens with n=--n (8), temperature 1,
logprobs, and per-prompt max_tokens uniform in --min-output..--max-output (128..1024, ignore_eos) under each row's
sampling settings: plain, top_p=0.95, top_k=50, min_p=0.05, top_logprobs=5, repetition_penalty=1.1. Each row first
runs a warm-up call whose max_tokens are spread over 1..64, so that the batch passes through every decode size and
the row's CUDA graphs are captured before timing. Then --repeats rounds run every row in turn, each call on fresh
prompts; it prints each call's rate as it goes, then the median output tokens / s of each row and its ratio to the
plain row.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import git_commit, model_source
from rollout import RolloutEngine, SamplingParams

ROWS = {"plain": {}, "top_p=0.95": dict(top_p=0.95), "top_k=50": dict(top_k=50), "min_p=0.05": dict(min_p=0.05),
        "top_logprobs=5": dict(top_logprobs=5), "repetition_penalty=1.1": dict(repetition_penalty=1.1)}


def batch(args, vocab: int, rng: random.Random, settings: dict, lengths: tuple[int, int]):
    """Fresh prompts and their per-prompt SamplingParams (max_tokens uniform in `lengths`)."""
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.prompts)]
    params = [SamplingParams(n=args.n, temperature=1.0, logprobs=True, ignore_eos=True,
                             max_tokens=rng.randint(*lengths), seed=rng.randrange(2**31), **settings)
              for _ in prompts]
    return prompts, params


def timed_call(engine: RolloutEngine, prompts, params) -> float:
    """Output tokens / s of one generate call (every sample runs to its max_tokens)."""
    start = time.perf_counter()
    outs = engine.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(s.token_ids) for o in outs for s in o.samples)
    assert tokens == sum(p.max_tokens * p.n for p in params)
    return tokens / seconds


def run_rows(args, vocab: int) -> dict[str, float]:
    engine = RolloutEngine(model=args.checkpoint, dtype="bfloat16", device=args.device,
                           max_num_seqs=args.prompts * args.n, max_model_len=args.input_len + args.max_output + 16,
                           max_num_batched_tokens=16384)
    rng, rates = random.Random(0), {}
    for settings in ROWS.values():
        timed_call(engine, *batch(args, vocab, rng, settings, (1, min(64, args.max_output))))
    for repeat in range(args.repeats):
        for row, settings in ROWS.items():
            rate = timed_call(engine, *batch(args, vocab, rng, settings, (args.min_output, args.max_output)))
            rates.setdefault(row, []).append(rate)
            print(f"call {repeat + 1}/{args.repeats} {row}: {rate:.0f} output tok/s", flush=True)
    engine.shutdown()
    return {row: statistics.median(r) for row, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--min-output", type=int, default=128)
    parser.add_argument("--max-output", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="'cpu' runs it without a GPU (e.g. a tiny config)")
    parser.add_argument("--json")
    args = parser.parse_args()
    model_source(Path(args.config), Path(args.checkpoint), random_weights=False, device=args.device)
    vocab = json.loads(Path(args.config).read_text())["vocab_size"]
    rates = run_rows(args, vocab)
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    print(f"model={Path(args.config).stem} device={device} commit={git_commit()} GRPO batch: {args.prompts} x "
          f"{args.input_len} in, n={args.n}, max_tokens {args.min_output}..{args.max_output}, temperature 1, "
          f"logprobs, bf16, median of {args.repeats}")
    print(f"{'row':<24} {'output tok/s':>13} {'/ plain':>8}")
    for row, rate in rates.items():
        print(f"{row:<24} {rate:13.0f} {rate / rates['plain']:8.2f}")
    if args.json:
        facts = vars(args) | dict(date=time.strftime("%Y-%m-%d"), device=device, commit=git_commit(), tok_s=rates)
        Path(args.json).write_text(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
