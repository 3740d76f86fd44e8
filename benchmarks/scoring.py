"""Prompt scoring throughput beside prefill throughput on the same prompts (issue 14).

    python -m benchmarks.scoring --config benchmarks/models/qwen3-0.6b.json --checkpoint /tmp/q06

--prompts (512) random prompts of --input-len (1,536) tokens on one engine (bf16, prefix caching off so that
every call computes every prompt): "prefill" generates one token per prompt (max_tokens=1), "scoring" asks
prompt_logprobs=0 with max_tokens=0. After a warm-up call of each, they alternate for --repeats calls; it prints
the median prompt tokens / s of each.
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

FORMS = {"prefill (max_tokens=1)": SamplingParams(max_tokens=1, ignore_eos=True),
         "scoring (prompt_logprobs=0, max_tokens=0)": SamplingParams(max_tokens=0, prompt_logprobs=0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--input-len", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json")
    args = parser.parse_args()
    model_source(Path(args.config), Path(args.checkpoint), random_weights=False, device=args.device)
    vocab = json.loads(Path(args.config).read_text())["vocab_size"]
    engine = RolloutEngine(model=args.checkpoint, dtype="bfloat16", device=args.device,
                           max_model_len=args.input_len + 16, max_num_batched_tokens=args.max_num_batched_tokens,
                           enable_prefix_caching=False)
    rng, rates = random.Random(0), {}
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.prompts)]
    for repeat in range(1 + args.repeats):
        for form, params in FORMS.items():
            start = time.perf_counter()
            engine.generate(prompts, params, use_tqdm=False)
            if repeat:
                rates.setdefault(form, []).append(args.prompts * args.input_len / (time.perf_counter() - start))
    engine.shutdown()
    rates = {form: statistics.median(r) for form, r in rates.items()}
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    print(f"model={Path(args.config).stem} device={device} commit={git_commit()} {args.prompts} prompts x "
          f"{args.input_len} tokens, bf16, median of {args.repeats}")
    for form, rate in rates.items():
        print(f"{form:<44} {rate:12.0f} prompt tok/s")
    prefill, scoring = rates.values()
    print(f"scoring / prefill: {scoring / prefill:.2f}")
    if args.json:
        facts = vars(args) | dict(date=time.strftime("%Y-%m-%d"), device=device, commit=git_commit(), tok_s=rates)
        Path(args.json).write_text(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
