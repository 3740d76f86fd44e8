"""`rollout serve` throughput and latency beside the in-process async engine, in the same run.

    python -m benchmarks.serve --config benchmarks/models/qwen3-0.6b.json --checkpoint /tmp/q06

The throughput workload of benchmarks/throughput.py (--prompts 256 of --input-len 128 random tokens,
--output-len 256 new tokens each, temperature 1, ignore_eos). First the in-process `AsyncRolloutEngine`: all
prompts as concurrent `await engine.generate` calls, --repeats times (after a warm-up), and --streams concurrent
`generate_stream` calls for latency; the engine is shut down. Then `rollout serve` as a subprocess with the same
engine settings: all prompts as concurrent clients posting token ids to `/generate` (no text anywhere), and
--streams concurrent streamed `/generate` calls. Output tokens / s (medians), time to first token (request to
first event) and inter-token latency (each later event's gap / its tokens) as percentiles. The HTTP clients are
aiohttp (`pip install aiohttp`), as in RL harnesses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import torch

from benchmarks.async_api import _async_call, _percentiles, _stream_latency
from benchmarks.common import git_commit, model_source
from benchmarks.throughput import workload
from rollout import AsyncRolloutEngine, SamplingParams
from weight_sync import free_port


def engine_settings(args, prompts, max_len: int) -> dict:
    return dict(dtype="bfloat16" if args.device != "cpu" else "float32", device=args.device,
                max_num_seqs=len(prompts), max_model_len=max_len, max_num_batched_tokens=16384,
                num_decode_steps=args.decode_steps, seed=0)


def in_process(args, prompts, params, settings: dict) -> dict:
    engine = AsyncRolloutEngine(model=args.checkpoint, **settings)
    asyncio.run(_async_call(engine, prompts[:8], SamplingParams(max_tokens=16, ignore_eos=True)))
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        tokens = asyncio.run(_async_call(engine, prompts, params))
        rates.append(tokens / (time.perf_counter() - start))
    latency = asyncio.run(_stream_latency(engine, prompts[:args.streams], params))
    asyncio.run(engine.shutdown())
    return dict(tok_s=statistics.median(rates), all_tok_s=rates, **latency)


async def _http_call(client, prompts, params) -> int:
    body = params.model_dump()

    async def one(prompt):
        async with client.post("/generate", json={"input_ids": prompt, "sampling_params": body}) as r:
            r.raise_for_status()
            return len((await r.json())["output_ids"])
    return sum(await asyncio.gather(*(one(p) for p in prompts)))


async def _http_latency(client, prompts, params) -> dict:
    body = params.model_dump()

    async def one(prompt):
        start = last = time.perf_counter()
        first, gaps = None, []
        async with client.post("/generate", json={"input_ids": prompt, "sampling_params": body,
                                                  "stream": True}) as r:
            async for raw in r.content:
                line = raw.decode().strip()
                if not line or line == "data: [DONE]":
                    continue
                count = len(json.loads(line[6:])["output_ids"])
                now = time.perf_counter()
                if first is None:
                    first = now - start
                elif count:
                    gaps += [(now - last) / count] * count
                last = now
        return first, gaps

    results = await asyncio.gather(*(one(p) for p in prompts))
    return dict(ttft_ms=_percentiles([r[0] for r in results]),
                itl_ms=_percentiles([g for r in results for g in r[1]]))


def through_server(args, prompts, params, settings: dict) -> dict:
    port = free_port()
    engine_args = {k: v for k, v in settings.items() if k not in ("device", "dtype", "seed")}
    command = [sys.executable, "-m", "rollout.cli", "serve", "--model", args.checkpoint, "--port", str(port),
               "--device", settings["device"], "--dtype", settings["dtype"], "--log-level", "warning",
               "--engine-args", json.dumps(engine_args)]
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))  # this checkout, and what it needs
    server = subprocess.Popen(command, env=dict(os.environ, PYTHONPATH=path))
    url = f"http://127.0.0.1:{port}"

    async def run():
        # aiohttp, as RL harnesses use: httpx's AsyncClient with a pool of hundreds of kept-alive connections
        # spends milliseconds per request in its pool (measured on CPU: 256 requests over reused connections took
        # 6.2 s through httpx and 0.6 s through aiohttp against the same server), so the clients set the pace
        connector = aiohttp.TCPConnector(limit=len(prompts) + 8)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:
            await _http_call(client, prompts[:8], SamplingParams(max_tokens=16, ignore_eos=True))
            rates = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                tokens = await _http_call(client, prompts, params)
                rates.append(tokens / (time.perf_counter() - start))
            latency = await _http_latency(client, prompts[:args.streams], params)
        return dict(tok_s=statistics.median(rates), all_tok_s=rates, **latency)

    try:
        _wait_healthy(url, server)
        return asyncio.run(run())
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"rollout serve did not answer /health (exit status {server.poll()})")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams timed for latency")
    parser.add_argument("--device", default="cuda", help="'cpu' for a smoke run")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args()
    args.workload = "fixed"
    model_source(Path(args.config), Path(args.checkpoint), random_weights=False, device=args.device)
    vocab = json.loads(Path(args.config).read_text())["vocab_size"]
    prompts, params, max_len = workload(args, vocab)
    settings = engine_settings(args, prompts, max_len)
    results = {"in-process async engine": in_process(args, prompts, params, settings),
               "rollout serve, HTTP /generate": through_server(args, prompts, params, settings)}
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    facts = dict(date=time.strftime("%Y-%m-%d"), device=device, commit=git_commit(), model=Path(args.config).stem,
                 prompts=len(prompts), input_len=args.input_len, output_len=args.output_len,
                 repeats=args.repeats, streams=args.streams, results=results)
    print(f"model={facts['model']} device={device} commit={facts['commit']} {len(prompts)} prompts x "
          f"{args.input_len} in / {args.output_len} out, median of {args.repeats}")
    print(f"{'path':<32} {'output tok/s':>13}   {args.streams} streams: TTFT p50/p99 (ms)   ITL p50/p99 (ms)")
    for path, r in results.items():
        print(f"{path:<32} {r['tok_s']:13.0f}   {r['ttft_ms']['p50']:9.1f} / {r['ttft_ms']['p99']:7.1f}"
              f"          {r['itl_ms']['p50']:6.2f} / {r['itl_ms']['p99']:6.2f}")
    local, http = (r["tok_s"] for r in results.values())
    print(f"server / in-process: {http / local:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
