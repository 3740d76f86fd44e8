"""256 concurrent streaming clients against a live server, some leaving early (disconnects), some aborted through
/abort_request: every stream ends with a final event and [DONE] or a clean disconnect, aborted ones end with
"abort", the rest equal a synchronous engine's samples, every KV block returns, and the server keeps serving."""

import asyncio
import json
import random

import httpx
import pytest

from rollout import RolloutEngine, SamplingParams
from serve_helpers import serving, wait_for

CONFIG = dict(device="cpu", dtype="float32", max_num_seqs=64, max_num_batched_tokens=512, seed=3)
CLIENTS = 256


@pytest.fixture(scope="module")
def live(text_checkpoint):
    yield from serving(text_checkpoint, CONFIG)


def workload():
    """(prompt, max_tokens, action) per client; aborted requests are long, so the abort lands mid-stream."""
    rng = random.Random(0)
    jobs = []
    for _ in range(CLIENTS):
        action = rng.choice(["finish", "finish", "disconnect", "abort"])
        prompt = [rng.randrange(3, 1000) for _ in range(rng.randrange(2, 24))]
        jobs.append((prompt, 200 if action == "abort" else rng.randrange(4, 24), action))
    return jobs


async def client_run(client, i, prompt, max_tokens, action):
    body = {"input_ids": prompt, "rid": f"c{i}", "stream": True,
            "sampling_params": {"max_tokens": max_tokens, "seed": i, "ignore_eos": True}}
    tokens, finish, aborted = [], None, None
    async with client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line:
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                return tokens, finish, aborted
            event = json.loads(data)
            tokens += event["output_ids"]
            finish = event["finish_reason"]
            if action == "disconnect":
                return None, None, None  # leaves the stream: the connection closes, the server aborts it
            if action == "abort" and aborted is None:
                aborted = (await client.post("/abort_request", json={"rid": f"c{i}"})).json()["aborted"]
    raise AssertionError(f"stream c{i} ended without [DONE]")


def test_many_clients_with_disconnects_and_aborts(live, text_checkpoint):
    jobs = workload()
    reference = RolloutEngine(model=str(text_checkpoint), **CONFIG)
    want = reference.generate([p for p, _, _ in jobs], [SamplingParams(max_tokens=m, seed=i, ignore_eos=True)
                                                         for i, (_, m, _) in enumerate(jobs)])
    reference.shutdown()

    async def main():
        limits = httpx.Limits(max_connections=CLIENTS + 8, max_keepalive_connections=CLIENTS + 8)
        async with httpx.AsyncClient(base_url=live.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*[client_run(client, i, *job) for i, job in enumerate(jobs)])
    results = asyncio.run(main())
    assert sum(bool(aborted) for _, _, aborted in results) > 0, "no abort landed mid-stream"
    for (prompt, max_tokens, action), (tokens, finish, aborted), expected in zip(jobs, results, want):
        sample = expected.samples[0]
        if action == "disconnect":
            continue
        if action == "abort" and aborted:
            assert finish == "abort" and tokens == sample.token_ids[:len(tokens)]
        else:
            assert finish == "length" and tokens == sample.token_ids
    core = live.server.engine.engine.core
    wait_for(lambda: core.block_manager.num_free == len(core.block_manager.blocks) and not live.server.app_state()
             .in_flight, "every KV block to return")
    r = httpx.post(f"{live.url}/generate", json={"input_ids": [5, 6, 7]}, timeout=60)
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 16
