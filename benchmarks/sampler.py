"""Sampler micro-benchmark: the fused Triton samplers against torch_sample, per setting, on random logits.

    python -m benchmarks.sampler [--rows 64 256] [--vocab 151936] [--repeats 50] [--json out.json]

Medians of `repeats` timed calls after warm-up (each call CUDA-synchronized; warm-up compiles the kernels).
Every fused result is checked against torch_sample's tokens first (a mismatch is reported, not timed away).
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.common import git_commit, median_time
from worker.penalties import PenaltyTensors
from worker.sampler import SamplingTensors, sample, torch_sample

CASES = {
    "plain": {},
    "top_p=0.95": dict(top_p=0.95),
    "top_k=50": dict(top_k=50),
    "min_p=0.05": dict(min_p=0.05),
    "top_logprobs=5": dict(k=5),
    "repetition_penalty=1.1": dict(repetition=1.1),
    "top_k=50,top_p=0.95,min_p=0.05": dict(top_k=50, top_p=0.95, min_p=0.05),
    "min_tokens (EOS banned)": dict(ban=True),
}


def tensors(rows: int, vocab: int, top_k=0, top_p=1.0, min_p=0.0, k=0, repetition=None, ban=False):
    """Temperature 1, processed logprobs, one seed per row; the case's setting on every row."""
    dev = "cuda"
    banned = torch.arange(rows, device=dev) if ban else torch.empty(0, dtype=torch.int64, device=dev)
    penalties = None
    if repetition is not None:
        gen = torch.Generator(device=dev).manual_seed(1)
        counts = torch.zeros(rows, vocab, dtype=torch.int32, device=dev)
        counts.scatter_add_(1, torch.randint(0, vocab, (rows, 512), device=dev, generator=gen),
                            torch.ones(rows, 512, dtype=torch.int32, device=dev))
        prompt = torch.zeros(rows, vocab, dtype=torch.bool, device=dev)
        prompt.scatter_(1, torch.randint(0, vocab, (rows, 512), device=dev, generator=gen), True)
        full = torch.full((rows,), repetition, device=dev)
        penalties = PenaltyTensors(full, torch.zeros_like(full), torch.zeros_like(full), counts, prompt)
    return SamplingTensors(
        temperature=torch.ones(rows, device=dev),
        top_k=torch.full((rows,), top_k if top_k > 0 else vocab, device=dev),
        top_p=torch.full((rows,), top_p if top_p < 1 else 2.0, device=dev),
        min_p=torch.full((rows,), min_p, device=dev),
        seeds=torch.arange(rows, device=dev) * 7919 + 3,
        steps=torch.zeros(rows, dtype=torch.int64, device=dev),
        use_raw=torch.zeros(rows, dtype=torch.bool, device=dev),
        banned_rows=banned, banned_cols=torch.full_like(banned, 2),
        needs_sort=top_k > 0 or top_p < 1, needs_min_p=min_p > 0, max_top_logprobs=k, penalties=penalties,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    results = []
    print(f"{'rows':>5} {'case':<34} {'fused ms':>9} {'torch ms':>9} {'speed-up':>8} {'same tokens':>11}")
    for rows in args.rows:
        gen = torch.Generator(device="cuda").manual_seed(rows)
        logits = (torch.randn(rows, args.vocab, device="cuda", generator=gen) * 3).to(torch.bfloat16)
        for name, case in CASES.items():
            t = tensors(rows, args.vocab, **case)
            same = torch.equal(sample(logits, t).token_ids, torch_sample(logits, t).token_ids)
            fused = median_time(lambda: sample(logits, t), args.repeats, warmup=3)
            reference = median_time(lambda: torch_sample(logits, t), max(5, args.repeats // 5), warmup=2)
            print(f"{rows:>5} {name:<34} {fused * 1e3:>9.3f} {reference * 1e3:>9.3f} {reference / fused:>8.1f} "
                  f"{str(same):>11}")
            results.append(dict(rows=rows, case=name, fused_ms=fused * 1e3, torch_ms=reference * 1e3, same=same))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(commit=git_commit(), vocab=args.vocab, device=torch.cuda.get_device_name(),
                           results=results), f, indent=1)


if __name__ == "__main__":
    main()
