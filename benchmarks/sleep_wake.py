"""Sleep / wake benchmark: level 1 and level 2 on a random checkpoint, beside raw pinned copies of the same bytes.

    python benchmarks/sleep_wake.py --config benchmarks/models/qwen3-8b.json --checkpoint /tmp/qwen3-8b

Prints one table and writes the numbers as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import MODELS, git_commit, median_time, model_source
from rollout import RolloutEngine, SamplingParams

GiB = 1 << 30


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def pinned_copy_baseline(nbytes: int, repeats: int) -> tuple[float, float]:
    """Median seconds of one pinned device->host and one host->device copy of `nbytes`."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    d2h = median_time(lambda: host.copy_(dev, non_blocking=True), repeats)
    h2d = median_time(lambda: dev.copy_(host, non_blocking=True), repeats)
    del dev
    torch.cuda.empty_cache()
    return d2h, h2d


def cycles(engine: RolloutEngine, level: int, count: int, gap_s: float) -> dict:
    """Time `count` sleep/wake cycles after one warm-up cycle, waking `gap_s` after the sleep returned.

    The gap stands for the trainer's step: the driver scrubs released memory in the
    background, and mapping memory released a moment ago waits for that scrub.
    """
    sleeps, wakes, freed = [], [], []
    for k in range(count + 1):
        free_awake = torch.cuda.mem_get_info()[0]
        t_sleep = timed(lambda: engine.sleep(level=level))
        freed_now = torch.cuda.mem_get_info()[0] - free_awake
        report = engine.memory_report() if k == count else None
        segments = [(s["total_size"], s["active_size"]) for s in torch.cuda.memory_snapshot()]
        time.sleep(gap_s)
        t_wake = timed(engine.wake_up)
        if k:
            sleeps.append(t_sleep), wakes.append(t_wake), freed.append(freed_now)
    return dict(sleep_s=statistics.median(sleeps), wake_s=statistics.median(wakes), freed_bytes=min(freed),
                gap_s=gap_s, asleep_report=report.model_dump(), torch_segments_asleep=sorted(segments)[-4:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, default=MODELS / "qwen3-8b.json")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/qwen3-8b"))
    parser.add_argument("--random-weights", action="store_true", help="config alone; the engine draws its weights")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--gap", type=float, default=1.0, help="seconds between sleep and wake (the trainer step)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    source = model_source(args.config, args.checkpoint, args.random_weights)
    engine = RolloutEngine(**source, device="cuda", dtype="bfloat16", enable_sleep_mode=True,
                           gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=4096)
    prompts = [[11 + k, 300 + k, 7000 + k] * 5 for k in range(4)]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outputs = lambda: [o.samples[0].token_ids for o in engine.generate(prompts, greedy, use_tqdm=False)]  # noqa: E731
    before = outputs()
    arenas = engine.memory_report().arenas
    runs = {f"level1{tail}": cycles(engine, 1, args.cycles, gap) for tail, gap in (("", 0.0), ("_gap", args.gap))}
    identical = outputs() == before
    runs |= {f"level2{tail}": cycles(engine, 2, args.cycles, gap) for tail, gap in (("", 0.0), ("_gap", args.gap))}
    engine.sleep(level=2)  # the baseline's buffers must not show in the engine's memory figures above
    d2h, h2d = pinned_copy_baseline(arenas["weights"].size_bytes, args.cycles)
    result = dict(gpu=torch.cuda.get_device_name(), commit=git_commit(), model=args.config.stem,
                  weights_bytes=arenas["weights"].size_bytes, kv_cache_bytes=arenas["kv_cache"].size_bytes,
                  pinned_d2h_s=d2h, pinned_h2d_s=h2d, runs=runs, outputs_identical_after_level1=identical)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


def print_table(r: dict) -> None:
    w, kv = r["weights_bytes"], r["kv_cache_bytes"]
    print(f"\n{r['model']} bf16 on {r['gpu']} (commit {r['commit']}): weights {w / GiB:.2f} GiB, KV cache "
          f"{kv / GiB:.2f} GiB; medians of {len(r['runs'])} x timed cycles, warm-up excluded")
    print(f"{'what':<44}{'seconds':>9}{'weights GB/s':>14}")
    print(f"{'raw pinned copy device->host (baseline)':<44}{r['pinned_d2h_s']:>9.3f}{w / r['pinned_d2h_s'] / 1e9:>14.1f}")
    print(f"{'raw pinned copy host->device (baseline)':<44}{r['pinned_h2d_s']:>9.3f}{w / r['pinned_h2d_s'] / 1e9:>14.1f}")
    for name, c in r["runs"].items():
        level = name[5]
        when = f"{c['gap_s']:.1f} s after sleep" if c["gap_s"] else "right after sleep"
        rate = lambda s: f"{w / s / 1e9:>14.1f}" if level == "1" else f"{'-':>14}"  # noqa: E731
        print(f"{f'level {level} sleep':<44}{c['sleep_s']:>9.3f}{rate(c['sleep_s'])}")
        print(f"{f'level {level} wake, {when}':<44}{c['wake_s']:>9.3f}{rate(c['wake_s'])}")
    c = r["runs"]["level1"]
    rep = c["asleep_report"]
    print(f"freed by sleep: {c['freed_bytes'] / GiB:.2f} GiB = {c['freed_bytes'] / (w + kv):.1%} of weights + KV; "
          f"left while asleep: device used {rep['device_used_bytes'] / GiB:.2f} GiB = torch allocator "
          f"{rep['torch_reserved_bytes'] / GiB:.2f} (live {rep['torch_allocated_bytes'] / GiB:.2f}) + other "
          f"(CUDA context, cuBLAS workspaces) {rep['other_bytes'] / GiB:.2f}")
    print(f"greedy outputs identical after level-1 cycles: {r['outputs_identical_after_level1']}")


if __name__ == "__main__":
    main()
