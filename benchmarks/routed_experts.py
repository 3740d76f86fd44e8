"""`benchmarks/throughput.py --routed-experts`: the cost of `return_routed_experts=True` on a MoE model.

One engine (prefix caching off, so no call reuses another's prompt blocks) runs the chosen workload without and
with `return_routed_experts`: after a warm-up call of each, the two alternate for --repeats calls each; medians of
output tokens / s, and the cost (1 - with / without). Every sample's rows are checked to be prompt + output - 1.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import git_commit
from rollout import RolloutEngine, SamplingParams


def _with_routes(params, on: bool):
    def one(p: SamplingParams) -> SamplingParams:
        return p.model_copy(update={"return_routed_experts": on})

    return [one(p) for p in params] if isinstance(params, list) else one(params)


def _timed_call(engine, prompts, params, routes: bool) -> float:
    start = time.perf_counter()
    outs = engine.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    for prompt, out in zip(prompts, outs):
        for s in out.samples:
            assert (s.routed_experts is not None) == routes
            assert not routes or len(s.routed_experts) == len(prompt) + len(s.token_ids) - 1
    return sum(len(s.token_ids) for o in outs for s in o.samples) / seconds


def report_routed_experts(args, prompts, params, max_len: int) -> None:
    engine = RolloutEngine(**args.source, dtype="bfloat16" if args.device != "cpu" else "float32",
                           device=args.device, max_num_seqs=len(prompts), max_model_len=max_len,
                           max_num_batched_tokens=16384, num_decode_steps=args.decode_steps,
                           enable_prefix_caching=False)
    forms = {"without": _with_routes(params, False), "with": _with_routes(params, True)}
    warm = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    for name in forms:
        engine.generate(prompts[:8], _with_routes(warm, name == "with"), use_tqdm=False)
    rates: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(args.repeats):
        for name, p in forms.items():
            rates[name].append(_timed_call(engine, prompts, p, name == "with"))
    engine.shutdown()
    median = {name: statistics.median(r) for name, r in rates.items()}
    cost = 1 - median["with"] / median["without"]
    gpu = torch.cuda.get_device_name(0) if args.device != "cpu" else "cpu"
    print(f"model={Path(args.config).stem} gpu={gpu} commit={git_commit()} {args.prompts} prompts, workload "
          f"{args.workload}, num_decode_steps={args.decode_steps}, median of {args.repeats} calls each")
    print(f"{'return_routed_experts':<24} {'output tok/s':>13}")
    for name in forms:
        print(f"{name:<24} {median[name]:13.0f}   (calls: {', '.join(f'{r:.0f}' for r in rates[name])})")
    print(f"cost of returning routed experts: {100 * cost:.1f}% (target <= 5%)")
    if args.json:
        facts = dict(date=time.strftime("%Y-%m-%d"), gpu=gpu, commit=git_commit(), model=Path(args.config).stem,
                     workload=args.workload, prompts=args.prompts, input_len=args.input_len, output_len=args.output_len,
                     decode_steps=args.decode_steps, tok_s=median, calls=rates, cost=cost)
        Path(args.json).write_text(json.dumps(facts, indent=2))
