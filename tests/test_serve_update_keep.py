"""`/update_weights` with pause_mode "keep" while 100 streams run: each stream's per-token weight versions switch
from 0 to the new version once, where the update landed; the tokens before the switch equal the old weights'."""

import asyncio
import json

import httpx
import pytest

from rollout import RolloutEngine, SamplingParams
from serve_helpers import save_text_checkpoint, serving

CONFIG = dict(device="cpu", dtype="float32", max_num_seqs=64, max_num_batched_tokens=512, seed=3)
STREAMS, MAX_TOKENS = 100, 120


@pytest.fixture(scope="module")
def live(text_checkpoint):
    yield from serving(text_checkpoint, CONFIG)


def test_update_in_keep_mode_mid_stream(live, text_checkpoint, tmp_path):
    new = save_text_checkpoint(tmp_path / "new", seed=1)
    prompts = [[3 + i, 50 + i, 7] for i in range(STREAMS)]
    old = RolloutEngine(model=str(text_checkpoint), **CONFIG)
    want = old.generate(prompts, [SamplingParams(max_tokens=MAX_TOKENS, seed=i, ignore_eos=True)
                                  for i in range(STREAMS)])
    old.shutdown()

    async def main():
        started = asyncio.Event()
        count = [0]

        async def stream(client, i):
            body = {"input_ids": prompts[i], "stream": True,
                    "sampling_params": {"max_tokens": MAX_TOKENS, "seed": i, "ignore_eos": True}}
            tokens, versions = [], []
            async with client.stream("POST", "/generate", json=body) as r:
                async for line in r.aiter_lines():
                    if line and line != "data: [DONE]":
                        event = json.loads(line.removeprefix("data: "))
                        tokens += event["output_ids"]
                        versions += event["weight_versions"]
                        if len(tokens) == len(event["output_ids"]):
                            count[0] += 1
                            if count[0] == 50:
                                started.set()
            return tokens, versions

        limits = httpx.Limits(max_connections=STREAMS + 8)
        async with httpx.AsyncClient(base_url=live.url, timeout=120, limits=limits) as client:
            tasks = [asyncio.ensure_future(stream(client, i)) for i in range(STREAMS)]
            await started.wait()
            r = await client.post("/update_weights", json={"path": str(new), "version": 5, "pause_mode": "keep"})
            assert r.json() == {"weight_version": 5}
            return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    switched = 0
    for (tokens, versions), expected in zip(results, want):
        assert len(tokens) == MAX_TOKENS and len(versions) == MAX_TOKENS
        k = versions.count(0)
        assert versions == [0] * k + [5] * (MAX_TOKENS - k)
        assert tokens[:k] == expected.samples[0].token_ids[:k]
        switched += 0 < k < MAX_TOKENS
    assert switched > 0, "the update landed mid-stream in no stream"
