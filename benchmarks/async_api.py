"""`benchmarks/throughput.py --api async`: the throughput workload through AsyncRolloutEngine, beside the synchronous
`generate` of the same engine in the same run, and the latency of concurrent streams.

Throughput: after a warm-up call of each path, the synchronous call (all prompts in one `generate`) and the async
one (one `await engine.generate(prompt)` per prompt, all concurrent) alternate for --repeats calls each; medians of
output tokens / s. Latency: --streams concurrent `generate_stream` calls of the same workload; time to first token
(submit to first delta) and inter-token latency (each later delta's gap / its tokens, so a decode round of k tokens
counts k gaps), as percentiles over all streams.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import git_commit
from rollout import AsyncRolloutEngine, SamplingParams


def _percentiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {f"p{q}": 1e3 * values[min(len(values) - 1, int(q / 100 * len(values)))] for q in (50, 90, 99)}


async def _async_call(engine, prompts, params) -> int:
    per = params if isinstance(params, list) else [params] * len(prompts)
    outs = await asyncio.gather(*(engine.generate(p, s) for p, s in zip(prompts, per)))
    return sum(len(s.token_ids) for o in outs for s in o.samples)


async def _stream_latency(engine, prompts, params) -> dict:
    per = params if isinstance(params, list) else [params] * len(prompts)

    async def one(prompt, p):
        start = last = time.perf_counter()
        first, gaps = None, []
        async for delta in engine.generate_stream(prompt, p):
            now = time.perf_counter()
            if first is None:
                first = now - start
            elif delta.token_ids:
                gaps += [(now - last) / len(delta.token_ids)] * len(delta.token_ids)
            last = now
        return first, gaps

    results = await asyncio.gather(*(one(p, s) for p, s in zip(prompts, per)))
    return dict(ttft_ms=_percentiles([r[0] for r in results]),
                itl_ms=_percentiles([g for r in results for g in r[1]]))


def report_async(args, prompts, params, max_len: int) -> None:
    engine = AsyncRolloutEngine(**args.source, dtype="bfloat16" if args.device != "cpu" else "float32",
                                device=args.device, max_num_seqs=len(prompts), max_model_len=max_len,
                                max_num_batched_tokens=16384, num_decode_steps=args.decode_steps)
    warm = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    engine.engine.generate(prompts[:8], warm, use_tqdm=False)
    asyncio.run(_async_call(engine, prompts[:8], warm))
    rates: dict[str, list[float]] = {"sync generate(list)": [], f"async, {len(prompts)} concurrent generate": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        outs = engine.engine.generate(prompts, params, use_tqdm=False)
        rates["sync generate(list)"].append(sum(len(s.token_ids) for o in outs for s in o.samples)
                                            / (time.perf_counter() - start))
        start = time.perf_counter()
        tokens = asyncio.run(_async_call(engine, prompts, params))
        rates[f"async, {len(prompts)} concurrent generate"].append(tokens / (time.perf_counter() - start))
    streams = prompts[:args.streams]
    latency = asyncio.run(_stream_latency(engine, streams, params if not isinstance(params, list)
                                          else params[:args.streams]))
    asyncio.run(engine.shutdown())
    medians = {form: statistics.median(r) for form, r in rates.items()}
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    facts = dict(date=time.strftime("%Y-%m-%d"), device=device, commit=git_commit(), model=Path(args.config).stem,
                 workload=args.workload, prompts=len(prompts), input_len=args.input_len, output_len=args.output_len,
                 decode_steps=args.decode_steps, repeats=args.repeats, tok_s=medians, all_tok_s=rates,
                 streams=len(streams), **latency)
    print(f"model={facts['model']} device={device} commit={facts['commit']} {len(prompts)} prompts, "
          f"{args.workload} workload, median of {args.repeats}")
    print(f"{'path':<36} {'output tok/s':>13}")
    for form, rate in medians.items():
        print(f"{form:<36} {rate:13.0f}")
    sync, async_ = medians.values()
    print(f"async / sync: {async_ / sync:.3f}")
    print(f"{len(streams)} concurrent streams: time to first token (ms) {latency['ttft_ms']}; inter-token latency "
          f"(ms) {latency['itl_ms']}")
    if args.json:
        Path(args.json).write_text(json.dumps(facts, indent=2))
