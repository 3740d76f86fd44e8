"""Weight-sync benchmark: trainer process on GPU0, engine on GPU1 (NCCL), then both on GPU0 (IPC).

    python -m benchmarks.weight_sync --config benchmarks/models/qwen3-8b.json --checkpoint /tmp/qwen3-8b

Rows, each the median of --repeats after one warm-up, measured end to end from
the trainer's `send` call to the engine's `update_weights` returning (engine
ready to generate), on one host clock:
  raw NCCL broadcast of the same bytes in one call (the floor), checkpoint-format
  update, kernel-format update of the whole weight arena; the same two over IPC.
Also the engine's extra peak memory during the update. Prints one table; --json writes it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import git_commit, model_source
from rollout import RolloutEngine, TransferInitInfo, run_together

GiB = 1 << 30


def _trainer(conn, config_path: str) -> None:
    """The trainer: a random transformers model on GPU0 in bf16, a WeightSender, and a raw broadcast."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer_adapters import WeightSender

    torch.cuda.set_device(0)
    config = AutoConfig.for_model(**json.loads(Path(config_path).read_text()))
    with torch.device("cuda:0"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    sender, kernel = None, None
    while True:
        cmd, arg = conn.recv()
        if cmd == "init":
            if sender is not None:
                sender.close()
            sender = WeightSender(TransferInitInfo(**arg), device="cuda:0")
            conn.send(None)
        elif cmd == "kernel":  # random tensors in the engine's own layout
            kernel = {name: torch.randn(shape, device="cuda:0").to(getattr(torch, dtype)) for name, dtype, shape in arg}
            conn.send(None)
        elif cmd == "send":
            weights = kernel if arg["format"] == "kernel" else model
            torch.cuda.synchronize()
            start = time.time()
            sender.send(weights, **arg)
            conn.send(start)
        elif cmd == "raw":
            buffer = torch.ones(arg, dtype=torch.uint8, device="cuda:0")
            transport = sender._sender.transport
            torch.cuda.synchronize()
            start = time.time()
            transport._broadcast(buffer)
            transport.stream.synchronize()
            conn.send(start)
        elif cmd == "exit":
            conn.send(None)
            return


def _peak_extra(device: torch.device, fn) -> tuple[object, int]:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    return result, torch.cuda.max_memory_allocated(device) - before


def timed_update(conn, engine, send_args: dict) -> tuple[float, int]:
    """One update: the engine waits first, then the trainer sends; seconds from send to engine ready."""
    done = {}

    def receive():
        done["memory"] = _peak_extra(engine.worker.device, engine.update_weights)[1]
        done["end"] = time.time()

    thread = threading.Thread(target=receive)
    thread.start()
    time.sleep(0.05)
    conn.send(("send", send_args))
    start = conn.recv()
    thread.join()
    return done["end"] - start, done["memory"]


def timed_raw(conn, engine, nbytes: int) -> float:
    transport = engine.worker.receiver.transport
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=engine.worker.device)
    torch.cuda.synchronize()
    conn.send(("raw", nbytes))
    transport._broadcast(buffer)
    transport.stream.synchronize()
    end = time.time()
    return end - conn.recv()


def run_backend(conn, backend: str, engine, args, nbytes: int, rows: list) -> None:
    info = TransferInitInfo.local(backend, timeout_s=60)

    def trainer_init():
        conn.send(("init", info.model_dump()))
        conn.recv()

    run_together(trainer_init, lambda: engine.init_weight_transfer(info))
    if backend == "nccl":
        times = [timed_raw(conn, engine, nbytes) for _ in range(args.repeats + 1)][1:]
        rows.append(dict(backend=backend, what="raw broadcast, one call", median_ms=statistics.median(times) * 1e3,
                         min_ms=min(times) * 1e3, gbps=nbytes / statistics.median(times) / 1e9, extra_gib=0.0))
    for fmt in ("checkpoint", "kernel"):
        for bucket_mb in args.bucket_mb:
            times, memory = [], 0
            for _ in range(args.repeats + 1):
                version = engine.weight_version + 1
                seconds, extra = timed_update(conn, engine, dict(version=version, format=fmt,
                                                                 bucket_bytes=(bucket_mb << 20) or None))
                times.append(seconds)
                memory = max(memory, extra)
            times = times[1:]
            size = f"{bucket_mb} MiB" if bucket_mb else "auto"
            rows.append(dict(backend=backend, what=f"{fmt} format, {size} buckets",
                             median_ms=statistics.median(times) * 1e3, min_ms=min(times) * 1e3,
                             gbps=nbytes / statistics.median(times) / 1e9, extra_gib=memory / GiB))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True, help="where the engine's random checkpoint is (or goes)")
    parser.add_argument("--random-weights", action="store_true", help="config alone; the engine draws its weights")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=int, nargs="+", default=[0], help="0: the sender's automatic size")
    parser.add_argument("--skip-ipc", action="store_true")
    parser.add_argument("--skip-nccl", action="store_true", help="IPC only (a one-GPU machine)")
    parser.add_argument("--json")
    args = parser.parse_args()
    source = model_source(Path(args.config), Path(args.checkpoint), args.random_weights)
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    trainer = ctx.Process(target=_trainer, args=(child, args.config), daemon=True)
    trainer.start()
    rows: list[dict] = []
    engine_kw = dict(dtype="bfloat16", kv_cache_memory_bytes=GiB, max_model_len=4096)
    engine = RolloutEngine(**source, device="cuda:0" if args.skip_nccl else "cuda:1", **engine_kw)
    layout = engine.worker.pool.weight_layout
    nbytes = sum(entry.nbytes for entry in layout)
    conn.send(("kernel", [(e.name, str(e.dtype).removeprefix("torch."), e.shape) for e in layout]))
    conn.recv()
    if not args.skip_nccl:
        run_backend(conn, "nccl", engine, args, nbytes, rows)
        engine.shutdown()
        engine = None
    if not args.skip_ipc:
        engine = engine or RolloutEngine(**source, device="cuda:0", **engine_kw)
        run_backend(conn, "ipc", engine, args, nbytes, rows)
    conn.send(("exit", None))
    conn.recv()
    report(args, nbytes, rows)


def report(args, nbytes: int, rows: list[dict]) -> None:
    facts = dict(date=time.strftime("%Y-%m-%d"), gpu=torch.cuda.get_device_name(0), commit=git_commit(),
                 model=Path(args.config).stem, weights_gib=nbytes / GiB, repeats=args.repeats)
    print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in facts.items()))
    print(f"{'backend':8} {'what':36} {'median ms':>10} {'min ms':>8} {'GB/s':>7} {'extra GiB':>10}")
    for r in rows:
        print(f"{r['backend']:8} {r['what']:36} {r['median_ms']:10.1f} {r['min_ms']:8.1f} {r['gbps']:7.0f} "
              f"{r['extra_gib']:10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(facts, rows=rows), indent=2))


if __name__ == "__main__":
    main()
