"""`/generate` (token in, token out) and the control routes against a live server: outputs equal a synchronous
RolloutEngine's; partial samples continue exactly; /abort_request ends a stream with "abort"; pause / resume;
weights loaded from a checkpoint path through /update_weights, and from a trainer process over a transfer group
joined through /init_weight_transfer; sleep / wake."""

import asyncio
import json

import httpx
import pytest
import torch

from rollout import RolloutEngine, SamplingParams, TransferInitInfo, run_together
from serve_helpers import save_text_checkpoint, serving, wait_for

CONFIG = dict(device="cpu", dtype="float32", max_num_seqs=32, max_num_batched_tokens=256, seed=3,
              enable_sleep_mode=True, num_kv_blocks=128, max_model_len=256)
PROMPT = [5, 17, 99, 200, 31, 7]


@pytest.fixture(scope="module")
def new_checkpoint(tmp_path_factory):
    return save_text_checkpoint(tmp_path_factory.mktemp("text-ckpt-1"), seed=1)


@pytest.fixture(scope="module")
def live(text_checkpoint):
    yield from serving(text_checkpoint, CONFIG)


def reference_run(checkpoint, prompts, params):
    engine = RolloutEngine(model=str(checkpoint), **CONFIG)
    try:
        return engine.generate(prompts, params)
    finally:
        engine.shutdown()


def post(live, path, body=None):
    return httpx.post(f"{live.url}{path}", json=body or {}, timeout=60)


def events(live, body):
    """The JSON events of a streamed /generate, checking it ends with [DONE]."""
    with httpx.stream("POST", f"{live.url}/generate", json=body, timeout=60) as r:
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_generate_equals_engine_streamed_or_not_and_continues_partials(live, text_checkpoint):
    params = dict(max_tokens=10, seed=21, logprobs=True, ignore_eos=True, n=2)
    want = reference_run(text_checkpoint, [PROMPT], SamplingParams(**params))[0].samples
    got = post(live, "/generate", {"input_ids": PROMPT, "sampling_params": params, "rid": "g1"}).json()
    assert [g["output_ids"] for g in got] == [w.token_ids for w in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.tensor(g["output_logprobs"]), torch.tensor(w.logprobs), atol=1e-4, rtol=0)
        assert g["weight_versions"] == [0] * 10 and g["finish_reason"] == "length" and g["rid"] == "g1"
    streamed = {0: [], 1: []}
    for event in events(live, {"input_ids": PROMPT, "sampling_params": params, "stream": True}):
        streamed[event["index"]] += event["output_ids"]
    assert [streamed[0], streamed[1]] == [w.token_ids for w in want]
    # continue sample 1 from its first 4 tokens: the same tokens as uninterrupted
    one = dict(params, n=1, max_tokens=6)
    partial = {"token_ids": want[1].token_ids[:4], "logprobs": want[1].logprobs[:4], "index": 1}
    got = post(live, "/generate", {"input_ids": PROMPT, "sampling_params": one, "partial": partial}).json()
    assert got["output_ids"] == want[1].token_ids
    assert got["weight_versions"] == [-1] * 4 + [0] * 6


def test_generate_scores_input_ids(live, text_checkpoint):
    """sampling_params.prompt_logprobs with max_tokens 0: the input's logprobs (those of the engine), no output."""
    params = dict(max_tokens=0, prompt_logprobs=2)
    want = reference_run(text_checkpoint, [PROMPT], SamplingParams(**params))[0]
    got = post(live, "/generate", {"input_ids": PROMPT, "sampling_params": params}).json()
    assert got["output_ids"] == [] and len(got["input_logprobs"]) == len(PROMPT) - 1
    torch.testing.assert_close(torch.tensor(got["input_logprobs"]), torch.tensor(want.prompt_logprobs), atol=1e-4,
                               rtol=0)
    assert [[int(t) for t in top] for top in got["input_top_logprobs"]] == \
        [list(top) for top in want.prompt_top_logprobs]


def test_abort_request_ends_a_stream_with_abort(live):
    async def main():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            body = {"input_ids": PROMPT, "rid": "long", "stream": True,
                    "sampling_params": {"max_tokens": 200, "ignore_eos": True, "seed": 1}}
            async with client.stream("POST", "/generate", json=body) as r:
                lines = r.aiter_lines()
                first = json.loads((await anext(lines)).removeprefix("data: "))
                assert first["output_ids"]
                # paused in keep mode the request cannot finish before the abort lands
                assert (await client.post("/pause_generation", json={"mode": "keep"})).status_code == 200
                aborted = (await client.post("/abort_request", json={"rid": "long"})).json()
                rest = [line.removeprefix("data: ") async for line in lines if line]
            assert (await client.post("/resume_generation")).status_code == 200
            assert (await client.post("/abort_request", json={"rid": "long"})).json() == {"aborted": []}
        return aborted, rest
    aborted, rest = asyncio.run(main())
    assert aborted == {"aborted": ["long"]}
    assert rest[-1] == "[DONE]" and json.loads(rest[-2])["finish_reason"] == "abort"


def test_update_weights_from_path_sleep_wake(live, new_checkpoint):
    greedy = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
    want_new = reference_run(new_checkpoint, [PROMPT], SamplingParams(**greedy))[0].samples[0].token_ids
    assert post(live, "/update_weights", {"path": str(new_checkpoint), "version": 3}).json() == {"weight_version": 3}
    assert httpx.get(f"{live.url}/weight_version").json() == {"weight_version": 3}
    got = post(live, "/generate", {"input_ids": PROMPT, "sampling_params": greedy}).json()
    assert got["output_ids"] == want_new and got["weight_versions"] == [3] * 8
    assert post(live, "/sleep", {"level": 1}).status_code == 200
    assert post(live, "/wake_up", {}).status_code == 200
    assert post(live, "/generate", {"input_ids": PROMPT, "sampling_params": greedy}).json()["output_ids"] == want_new
    r = post(live, "/load_weights_from_disk", {"path": "/nonexistent"})
    assert r.status_code == 400 and "safetensors" in r.json()["error"]["message"]


def test_transfer_group_updates_over_http(live, trainer, text_checkpoint, new_checkpoint):
    """A trainer process joins the engine through /init_weight_transfer, then pushes two updates, each met by a
    POST /update_weights: greedy outputs follow the weights sent."""
    greedy = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
    info = TransferInitInfo.local("gloo", timeout_s=20)
    body = {"init_info": {**info.model_dump(mode="json"), "secret": info.secret.get_secret_value()}}
    replies = []
    run_together(lambda: trainer.call("init", **info.model_dump()),
                 lambda: replies.append(post(live, "/init_weight_transfer", body)))
    assert replies[-1].json() == {"joined": True}
    for checkpoint in (new_checkpoint, text_checkpoint):
        want = reference_run(checkpoint, [PROMPT], SamplingParams(**greedy))[0].samples[0].token_ids
        version = httpx.get(f"{live.url}/weight_version").json()["weight_version"] + 1
        run_together(lambda: trainer.call("send", weights={"checkpoint": str(checkpoint)}, version=version),
                     lambda: replies.append(post(live, "/update_weights", {"pause_mode": "keep"})))
        assert replies[-1].json() == {"weight_version": version}
        got = post(live, "/generate", {"input_ids": PROMPT, "sampling_params": greedy}).json()
        assert got["output_ids"] == want and got["weight_versions"] == [version] * 8


def test_client_leaving_a_whole_response_aborts_it(live):
    """A client that disconnects before its (not streamed) response is ready: its request ends and its KV blocks
    return (generation paused in keep mode meanwhile, so it cannot finish first)."""
    s = live.server.app_state()
    core = live.server.engine.engine.core

    async def main():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as control:
            assert (await control.post("/pause_generation", json={"mode": "keep"})).status_code == 200
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
                body = {"input_ids": PROMPT, "rid": "leaver", "sampling_params": {"max_tokens": 100}}
                task = asyncio.ensure_future(client.post("/generate", json=body))
                while "leaver" not in s.in_flight:
                    await asyncio.sleep(0.01)
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            while s.in_flight:
                await asyncio.sleep(0.01)
            assert (await control.post("/resume_generation")).status_code == 200

    asyncio.run(asyncio.wait_for(main(), 60))
    wait_for(lambda: core.block_manager.num_free == len(core.block_manager.blocks), "the KV blocks to return")


def metrics(live) -> dict[str, float]:
    text = httpx.get(f"{live.url}/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}


def test_metrics(live):
    before = metrics(live)
    body = {"input_ids": PROMPT, "sampling_params": {"max_tokens": 10, "n": 2, "ignore_eos": True}}
    assert post(live, "/generate", body).status_code == 200
    events(live, dict(body, stream=True))
    after = metrics(live)
    assert after["rollout_generated_tokens_total"] - before["rollout_generated_tokens_total"] == 40
    assert after["rollout_requests_total"] - before["rollout_requests_total"] == 2
    assert after["rollout_kv_blocks_total"] == CONFIG["num_kv_blocks"] and after["rollout_requests_running"] == 0
    assert after["rollout_sleeping"] == 0 and after["rollout_weight_version"] >= 0
    assert after["rollout_step_seconds_count"] - before["rollout_step_seconds_count"] >= 4  # 2 requests x >= 2 steps
    assert after["rollout_step_seconds_sum"] > before["rollout_step_seconds_sum"] and after["rollout_last_step_seconds"] > 0
    assert post(live, "/sleep", {"level": 1}).status_code == 200
    assert metrics(live)["rollout_sleeping"] == 1
    assert post(live, "/wake_up", {"tags": ["weights"]}).status_code == 200
    assert metrics(live)["rollout_sleeping"] == 1
    assert post(live, "/wake_up", {"tags": ["kv_cache"]}).status_code == 200
    assert metrics(live)["rollout_sleeping"] == 0
