"""`GET /metrics` in Prometheus' text format: requests, KV blocks, generated tokens, step time, weight version,
sleep."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from rollout.serve.state import ServerState, state

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request):
    """Counters and gauges of the server and its engine (running / waiting / KV blocks: in-process engines only)."""
    s = state(request)
    lines: list[str] = []

    def add(name: str, kind: str, help_text: str, value) -> None:
        lines.extend([f"# HELP rollout_{name} {help_text}", f"# TYPE rollout_{name} {kind}",
                      f"rollout_{name} {value}"])

    add("requests_total", "counter", "Engine requests received over HTTP.", s.requests_total)
    add("requests_in_flight", "gauge", "Engine requests of HTTP requests not ended yet.", len(s.in_flight))
    add("generated_tokens_total", "counter", "Tokens generated for HTTP requests.", s.generated_tokens_total)
    add("weight_version", "gauge", "Version of the weights serving.", s.engine.weight_version)
    add("sleeping", "gauge", "1 while any of the engine's memory is asleep.", int(bool(s.asleep)))
    core = _local_core(s)
    if core is not None:  # read from another thread: sizes only, each read whole (a snapshot, not a transaction)
        blocks = core.block_manager
        add("requests_running", "gauge", "Samples the scheduler is running.", len(core.scheduler.running))
        add("requests_waiting", "gauge", "Samples waiting for a slot or KV blocks.", len(core.scheduler.waiting))
        add("kv_blocks_total", "gauge", "KV cache blocks.", len(blocks.blocks))
        add("kv_blocks_used", "gauge", "KV cache blocks held by samples.", len(blocks.blocks) - blocks.num_free)
        stats = s.engine.engine.loop.stats
        lines.extend(["# HELP rollout_step_seconds Wall time of the engine's steps (a step reading a decode round "
                      "of several device steps counts once).", "# TYPE rollout_step_seconds summary",
                      f"rollout_step_seconds_sum {stats.seconds}", f"rollout_step_seconds_count {stats.steps}"])
        add("last_step_seconds", "gauge", "Wall time of the engine's latest step.", stats.last_seconds)
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


def _local_core(s: ServerState):
    """The in-process engine's core (None behind the Ray executor, whose replicas run elsewhere)."""
    local = getattr(s.engine, "engine", None)
    return getattr(local, "core", None)
