"""Generation throughput against transformers `generate`, and decode step time against the memory roofline.

    python -m benchmarks.throughput --config benchmarks/models/qwen3-0.6b.json --checkpoint /tmp/q06

Default workload (issue 5): 256 prompts of 128 random tokens, 256 new tokens each
(ignore_eos), temperature 1, bf16. Both engines run in this process on the same GPU,
each after a short warm-up call; output tokens / wall seconds of one timed call.
The roofline of a decode step is (weight bytes + KV bytes of every context read)
/ the copy bandwidth measured here (for a MoE model, e.g. --config
benchmarks/models/qwen3-30b-a3b.json, only the experts a step is expected to
touch count; see touched_weight_bytes); the table reports the median over full-batch
decode rounds of (time from the round's start to the next's) / its steps.

GRPO workload (issue 11): `--workload grpo` times --prompts (64) prompts x n=--n (16)
against the same samples sent as separate prompts (each prompt --n times with n=1):
--input-len tokens in, --output-len out, temperature 1, both on one engine in this
run. After a warm-up call of each, the two alternate for --repeats calls each, on
fresh random prompts every call (no prefix-cache hits across calls); it prints the
median output tokens / s of each. `--device cpu` runs it on the CPU (e.g. a tiny config).
The issue-14 rows (the GRPO batch under each sampling setting, side by side) are
benchmarks/sampling_rows.py.

Async API (issue 12): `--api async` runs the chosen workload through AsyncRolloutEngine (one
concurrent `generate` per prompt) beside the synchronous `generate` in the same run, and the
latency of --streams concurrent streams; see benchmarks/async_api.py.

Routed experts (issue 16): `--routed-experts` runs the chosen workload on a MoE model without and with
`return_routed_experts=True` on one engine in the same run (alternating, --repeats calls each) and prints
the cost; see benchmarks/routed_experts.py.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from benchmarks.async_api import report_async
from benchmarks.common import git_commit, model_source
from benchmarks.routed_experts import report_routed_experts
from rollout import EngineConfig, RolloutEngine, SamplingParams


def copy_bandwidth(gib: int = 2) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    src = torch.empty(gib << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del src, dst
    return 2 * (gib << 30) / statistics.median(times[1:])


class StepTimer:
    """Records when each batch or decode round is started on the worker, with its size and context lengths.

    A round queued behind the one before (`resume`) starts when that one's tokens are read, so in steady
    decoding the time from one start to the next is a round's time on the device (or the host's, if longer).
    """

    def __init__(self, worker):
        self.rounds = []  # (start time, sequences, context tokens at the round's first step, steps, decode)
        launch, resume = worker.launch, worker.resume

        def timed_launch(batch):
            decode = all(len(c.token_ids) == 1 for c in batch.chunks)
            ctx = sum(c.start_pos + len(c.token_ids) for c in batch.chunks)
            self.rounds.append((time.perf_counter(), len(batch.chunks), ctx, batch.num_steps, decode))
            return launch(batch)

        def timed_resume(previous, num_steps, tables):
            _, n, ctx, k, _ = self.rounds[-1]
            self.rounds.append((time.perf_counter(), n, ctx + n * k, num_steps, True))
            return resume(previous, num_steps, tables)

        worker.launch, worker.resume = timed_launch, timed_resume


def run_ours(source: dict, prompts, params, max_model_len: int,
             decode_steps: int) -> tuple[float, StepTimer, RolloutEngine]:
    engine = RolloutEngine(**source, dtype="bfloat16", max_num_seqs=len(prompts), max_model_len=max_model_len,
                           max_num_batched_tokens=16384, num_decode_steps=decode_steps)
    warm = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    engine.generate(prompts[:8], warm, use_tqdm=False)
    timer = StepTimer(engine.worker)
    start = time.perf_counter()
    outs = engine.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(s.token_ids) for o in outs for s in o.samples)
    return tokens / seconds, timer, engine


def run_transformers(source: dict, prompts, new_tokens: int) -> float:
    """transformers `generate` output tokens / s on the same model (random weights: its own, drawn on the GPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if source.get("load_format") == "dummy":
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source["model"]),
                                                     dtype=torch.bfloat16).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(source["model"], dtype=torch.bfloat16).cuda().eval()
    ids = torch.tensor(prompts, device="cuda")
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:8], attention_mask=torch.ones_like(ids[:8]), max_new_tokens=16, min_new_tokens=16,
                       **kwargs)
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, **kwargs)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    del model
    torch.cuda.empty_cache()
    return tokens / seconds


def roofline(engine: RolloutEngine, timer: StepTimer, bandwidth: float) -> dict:
    """Median full-batch decode step against (weights + KV read) / bandwidth."""
    worker = engine.worker
    hf = worker.hf_config
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    kv_per_token = hf.num_hidden_layers * 2 * hf.num_key_value_heads * head_dim * worker.dtype.itemsize
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in worker.model.parameters()}.values())
    rounds = timer.rounds
    full = max(n for _, n, _, _, decode in rounds if decode)
    pairs = [(b[0] - a[0], a) for a, b in zip(rounds, rounds[1:]) if a[4] and a[1] == full]
    measured = statistics.median(t / a[3] for t, a in pairs)  # a round of k steps counts as k steps
    ideal = statistics.median(
        sum(touched_weight_bytes(worker.model, weights, n) + (ctx + j * n) * kv_per_token for j in range(k)) / k
        / bandwidth for _, (_, n, ctx, k, _) in pairs)
    return dict(batch=full, decode_rounds=len(pairs), steps_per_round=statistics.median(a[3] for _, a in pairs),
                step_ms=measured * 1e3, roofline_ms=ideal * 1e3, of_roofline=ideal / measured,
                weight_gb=weights / 1e9, bandwidth_tb_s=bandwidth / 1e12)


def touched_weight_bytes(model, weights: int, batch: int) -> float:
    """Weight bytes a decode step of `batch` sequences reads: all of a dense model; for a MoE model, of each
    layer's experts only the expected number touched when routing is uniform (random weights route nearly so):
    E * (1 - (1 - top_k / E) ** batch)."""
    experts = 0
    touched = 0.0
    for block in model.moe_blocks():
        size = sum(p.numel() * p.element_size() for p in (block.experts.w13, block.experts.w2))
        e, k = block.experts.local, block.top_k
        experts += size
        touched += size * (1 - (1 - k / e) ** batch)
    return weights - experts + touched


def workload(args, vocab: int):
    """Prompts, sampling params (one or one per prompt) and max_model_len of the chosen workload."""
    rng = random.Random(0)
    if args.workload == "nanovllm":  # nano-vllm's bench.py: lengths uniform in 100..1024, temperature 0.6
        prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(args.prompts)]
        params = [SamplingParams(temperature=0.6, max_tokens=rng.randint(100, 1024), ignore_eos=True, seed=0)
                  for _ in range(args.prompts)]
        return prompts, params, 4096
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.prompts)]
    params = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True, seed=0)
    return prompts, params, args.input_len + args.output_len + 16


def grpo_forms(args, vocab: int, rng: random.Random) -> dict[str, tuple[list[list[int]], SamplingParams]]:
    """The two forms of one GRPO batch, each on its own fresh prompts of the same length."""
    params = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.output_len, ignore_eos=True)

    def prompts() -> list[list[int]]:
        return [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.prompts)]

    return {f"{args.prompts} prompts x n={args.n}": (prompts(), params),
            f"{args.prompts * args.n} separate prompts": ([p for p in prompts() for _ in range(args.n)],
                                                           params.model_copy(update={"n": 1}))}


def run_grpo(args, vocab: int) -> dict[str, float]:
    """Median output tokens / s of each form over --repeats alternating calls, after a warm-up call of each."""
    engine = RolloutEngine(**args.source, dtype="bfloat16", device=args.device,
                           max_num_seqs=args.prompts * args.n, max_model_len=args.input_len + args.output_len + 16,
                           max_num_batched_tokens=16384, num_decode_steps=args.decode_steps)
    rng, rates = random.Random(0), {}
    for repeat in range(1 + args.repeats):
        for form, (prompts, params) in grpo_forms(args, vocab, rng).items():
            start = time.perf_counter()
            outs = engine.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens = sum(len(s.token_ids) for o in outs for s in o.samples)
            assert tokens == args.prompts * args.n * args.output_len
            if repeat:
                rates.setdefault(form, []).append(tokens / seconds)
    engine.shutdown()
    return {form: statistics.median(r) for form, r in rates.items()}


def report_grpo(args, vocab: int) -> None:
    rates = run_grpo(args, vocab)
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    facts = dict(date=time.strftime("%Y-%m-%d"), device=device, commit=git_commit(), model=Path(args.config).stem,
                 workload="grpo", prompts=args.prompts, n=args.n, input_len=args.input_len,
                 output_len=args.output_len, decode_steps=args.decode_steps, repeats=args.repeats, tok_s=rates)
    print(f"model={facts['model']} device={device} commit={facts['commit']} GRPO batch: {args.input_len} in, "
          f"{args.output_len} out, temperature 1, bf16, median of {args.repeats}")
    print(f"{'form':<28} {'output tok/s':>13}")
    for form, rate in rates.items():
        print(f"{form:<28} {rate:13.0f}")
    grouped, separate = rates.values()
    print(f"grouped / separate: {grouped / separate:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(facts, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--random-weights", action="store_true",
                        help="no checkpoint files: --checkpoint gets the config alone and both engines draw random "
                             "weights on the device (e.g. Qwen3-30B-A3B, 61 GB)")
    parser.add_argument("--prompts", type=int, help="default 256 (grpo: 64)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--workload", choices=["fixed", "nanovllm", "grpo"], default="fixed",
                        help="fixed: --prompts x (--input-len in, --output-len out); nanovllm: nano-vllm's bench; "
                             "grpo: --prompts x n=--n against the same samples as separate prompts")
    parser.add_argument("--n", type=int, default=16, help="samples per prompt (grpo)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each form (grpo, routed experts)")
    parser.add_argument("--device", default="cuda", help="grpo, async, routed experts: 'cpu' runs it without a GPU")
    parser.add_argument("--decode-steps", type=int, default=EngineConfig.model_fields["num_decode_steps"].default,
                        help="num_decode_steps of our engine")
    parser.add_argument("--skip-transformers", action="store_true", help="only our engine (e.g. for 8B)")
    parser.add_argument("--api", choices=["sync", "async"], default="sync",
                        help="async: the workload through AsyncRolloutEngine beside the synchronous call")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams timed for latency (async)")
    parser.add_argument("--routed-experts", action="store_true",
                        help="MoE models: the workload without and with return_routed_experts=True, alternating")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not args.device.startswith("cuda") and args.workload != "grpo" and args.api != "async" and \
            not args.routed_experts:
        parser.error("--device applies to --workload grpo and --api async only (the others measure against the "
                     "GPU's roofline)")
    args.prompts = args.prompts or (64 if args.workload == "grpo" else 256)
    args.source = model_source(Path(args.config), Path(args.checkpoint), args.random_weights, args.device)
    vocab = json.loads(Path(args.config).read_text())["vocab_size"]
    if args.workload == "grpo":
        report_grpo(args, vocab)
        return
    prompts, params, max_len = workload(args, vocab)
    if args.api == "async":
        report_async(args, prompts, params, max_len)
        return
    if args.routed_experts:
        report_routed_experts(args, prompts, params, max_len)
        return
    bandwidth = copy_bandwidth()
    ours, timer, engine = run_ours(args.source, prompts, params, max_len, args.decode_steps)
    step = roofline(engine, timer, bandwidth)
    engine.shutdown()
    del engine
    torch.cuda.empty_cache()
    skip = args.skip_transformers or args.workload != "fixed"
    theirs = None if skip else run_transformers(args.source, prompts, args.output_len)
    facts = dict(date=time.strftime("%Y-%m-%d"), gpu=torch.cuda.get_device_name(0), commit=git_commit(),
                 model=Path(args.config).stem, workload=args.workload, prompts=args.prompts, input_len=args.input_len,
                 output_len=args.output_len, decode_steps=args.decode_steps, ours_tok_s=ours, transformers_tok_s=theirs, decode=step)
    shape = ("nano-vllm workload (in, out uniform 100..1024, temperature 0.6)" if args.workload == "nanovllm"
             else f"{args.input_len} in, {args.output_len} out, temperature 1")
    print(f"model={facts['model']} gpu={facts['gpu']} commit={facts['commit']} {args.prompts} prompts, {shape}, "
          f"bf16")
    print(f"{'engine':<24} {'output tok/s':>13}")
    print(f"{'rollout-engine':<24} {ours:13.0f}   (num_decode_steps={args.decode_steps})")
    if theirs:
        print(f"{'transformers generate':<24} {theirs:13.0f}")
        print(f"speedup {ours / theirs:.1f}x")
    print(f"decode step at batch {step['batch']} (median over {step['decode_rounds']} rounds of "
          f"{step['steps_per_round']:g} steps): {step['step_ms']:.2f} ms; "
          f"roofline {step['roofline_ms']:.2f} ms ({step['weight_gb']:.2f} GB weights + KV at "
          f"{step['bandwidth_tb_s']:.2f} TB/s) = {100 * step['of_roofline']:.0f}% of roofline")
    if args.json:
        Path(args.json).write_text(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
