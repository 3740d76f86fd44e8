"""AsyncRolloutEngine: concurrent streams against one synchronous generate, abort and cancel, partial rollouts,
pause modes and weight updates while streams run, event-loop lag, bad input."""

import asyncio
import random
import statistics
import time

import pytest
import torch
from safetensors.torch import load_file

from rollout import AsyncRolloutEngine, EnginePausedError, InvalidRequestError, PartialSample, SamplingParams
from rollout.errors import EngineClosedError

CONFIG = dict(device="cpu", dtype="float32", max_num_seqs=64, max_num_batched_tokens=512, seed=3)


@pytest.fixture(scope="module")
def engine(checkpoint_dir):
    eng = AsyncRolloutEngine(model=str(checkpoint_dir("qwen3", 0)), **CONFIG)
    yield eng
    asyncio.run(eng.shutdown())


def mixed_requests(count: int, seed: int = 0):
    """(prompt, params) pairs: greedy and seeded sampling, filters, n=2, stop ids, min_tokens, top logprobs."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        prompt = [rng.randrange(3, 300) for _ in range(rng.randrange(3, 40))]
        kind = i % 6
        params = dict(max_tokens=rng.randrange(4, 20), logprobs=True, seed=1000 + i, ignore_eos=True)
        params.update([dict(temperature=0), dict(temperature=1.0), dict(top_k=20), dict(top_p=0.8, n=2),
                       dict(min_tokens=3, stop_token_ids=[7, 11], ignore_eos=False), dict(top_logprobs=2)][kind])
        out.append((prompt, SamplingParams(**params)))
    return out


def assert_same(got, want, atol=1e-5):
    assert got.token_ids == want.token_ids
    assert got.finish_reason == want.finish_reason
    if want.logprobs is not None:
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=atol, rtol=0)


async def collect(engine, prompt, params, **kwargs):
    """Run one stream; returns per sample index the concatenated deltas (token ids, logprobs, versions, finish)."""
    samples: dict[int, dict] = {}
    async for delta in engine.generate_stream(prompt, params, **kwargs):
        s = samples.setdefault(delta.index, dict(token_ids=[], logprobs=[], versions=[], finish=None))
        assert s["finish"] is None, "a delta arrived after its sample's final one"
        s["token_ids"] += delta.token_ids
        s["logprobs"] += delta.logprobs or []
        s["versions"] += delta.weight_versions
        s["finish"] = delta.finish_reason
    return samples


def test_200_concurrent_streams_equal_one_synchronous_generate(engine):
    requests = mixed_requests(200)
    want = engine.engine.generate([p for p, _ in requests], [s for _, s in requests], use_tqdm=False)

    async def main():
        return await asyncio.gather(*(collect(engine, p, s) for p, s in requests))

    streams = asyncio.run(main())
    for stream, output in zip(streams, want):
        assert sorted(stream) == list(range(len(output.samples)))
        for index, sample in enumerate(output.samples):
            got = stream[index]
            assert got["token_ids"] == sample.token_ids and got["finish"] == sample.finish_reason
            assert got["versions"] == sample.token_weight_versions == [0] * len(sample.token_ids)
            torch.testing.assert_close(torch.tensor(got["logprobs"]), torch.tensor(sample.logprobs), atol=1e-5,
                                       rtol=0)


def test_generate_returns_the_whole_output(engine):
    prompt, params = mixed_requests(1, seed=5)[0]
    want = engine.engine.generate([prompt], params, use_tqdm=False)[0]
    got = asyncio.run(engine.generate(prompt, params, request_id="whole"))
    assert got.request_id == "whole" and got.prompt_token_ids == prompt
    for g, w in zip(got.samples, want.samples):
        assert_same(g, w)


async def stream_and_abort(eng, prompt, params, request_id: str, after: int) -> dict:
    """Stream a request and abort it once `after` tokens are out; returns its concatenated deltas."""
    got = dict(token_ids=[], logprobs=[], versions=[], finish=None)
    async for delta in eng.generate_stream(prompt, params, request_id=request_id):
        got["token_ids"] += delta.token_ids
        got["logprobs"] += delta.logprobs or []
        got["versions"] += delta.weight_versions
        got["finish"] = delta.finish_reason
        if len(got["token_ids"]) >= after and delta.finish_reason is None:
            assert await eng.abort(request_id) in (True, False)
    return got


@pytest.mark.parametrize("caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
def test_abort_then_continue_equals_uninterrupted(checkpoint_dir, caching, temperature):
    eng = AsyncRolloutEngine(model=str(checkpoint_dir("qwen3", 0)), **{**CONFIG, "enable_prefix_caching": caching})
    prompt = [5, 17, 99, 4, 250, 31, 8, 8, 120, 64, 3, 77, 19, 40, 41, 42, 43, 200, 7]
    params = SamplingParams(temperature=temperature, max_tokens=40, seed=11, logprobs=True, ignore_eos=True)
    try:
        whole = asyncio.run(eng.generate(prompt, params)).samples[0]
        part = asyncio.run(stream_and_abort(eng, prompt, params, "r", after=5))
        k = len(part["token_ids"])
        assert part["finish"] == "abort" and 5 <= k < 40
        assert part["token_ids"] == whole.token_ids[:k]
        partial = PartialSample(token_ids=part["token_ids"], logprobs=part["logprobs"],
                                token_weight_versions=part["versions"])
        rest = params.model_copy(update={"max_tokens": 40 - k})
        cont = asyncio.run(eng.generate(prompt, rest, partial=partial)).samples[0]
        assert_same(cont, whole)
        assert cont.token_weight_versions == [0] * 40
        hits = eng.engine.core.block_manager.num_hit_blocks
        assert (hits > 0) == caching  # the prompt and partial tokens came back from the prefix cache
    finally:
        asyncio.run(eng.shutdown())


# ----------------------------------------------------------------------------------------------------------
# Weight updates and pause modes while 100 streams run
# ----------------------------------------------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=True)
PROMPTS = [[(13 * i + 7 * j) % 290 + 5 for j in range(3 + i % 17)] for i in range(100)]


@pytest.fixture(scope="module")
def greedy_old_new(checkpoint_dir):
    """Greedy GREEDY outputs of fresh engines on the old (seed 0) and new (seed 1) checkpoints."""
    outs = []
    for seed in (0, 1):
        eng = AsyncRolloutEngine(model=str(checkpoint_dir("qwen3", seed)), **CONFIG)
        outs.append([o.samples[0].token_ids for o in eng.engine.generate(PROMPTS, GREEDY, use_tqdm=False)])
        asyncio.run(eng.shutdown())
    return outs


async def streams_with_update(eng, update, after_tokens: int = 2):
    """Run 100 streams; once some sample has `after_tokens` tokens, run `update()` and then start 10 more streams
    (of the first 10 prompts). Returns (streams, late streams)."""
    first_tokens = asyncio.Event()

    async def watched(prompt):
        samples: dict = {}
        async for delta in eng.generate_stream(prompt, GREEDY):
            s = samples.setdefault(delta.index, dict(token_ids=[], versions=[], finish=None))
            s["token_ids"] += delta.token_ids
            s["versions"] += delta.weight_versions
            s["finish"] = delta.finish_reason
            if len(s["token_ids"]) >= after_tokens:
                first_tokens.set()
        return samples[0]

    tasks = [asyncio.ensure_future(watched(p)) for p in PROMPTS]
    await first_tokens.wait()
    await update()
    late = [asyncio.ensure_future(watched(p)) for p in PROMPTS[:10]]
    return await asyncio.gather(*tasks), await asyncio.gather(*late)


def new_weights(checkpoint_dir):
    return list(load_file(str(checkpoint_dir("qwen3", 1) / "model.safetensors")).items())


def split_versions(sample) -> int:
    """How many leading tokens came from version 0; the rest must all be version 1."""
    k = sample["versions"].count(0)
    assert sample["versions"] == [0] * k + [1] * (len(sample["versions"]) - k)
    return k


def test_keep_update_mid_stream_switches_versions_where_it_landed(checkpoint_dir, greedy_old_new):
    old, new = greedy_old_new
    eng = AsyncRolloutEngine(model=str(checkpoint_dir("qwen3", 0)), **CONFIG)
    weights = new_weights(checkpoint_dir)
    try:
        streams, late = asyncio.run(streams_with_update(
            eng, lambda: eng.load_weights(weights, pause_mode="keep")))
    finally:
        asyncio.run(eng.shutdown())
    switched = 0
    for s, want_old in zip(streams, old):
        k = split_versions(s)
        assert s["finish"] == "length" and s["token_ids"][:k] == want_old[:k]  # before the update: old weights
        switched += 0 < k < 24
    assert switched > 0  # the update landed mid-sample for some
    for s, want_new in zip(late, new):
        assert s["versions"] == [1] * 24 and s["token_ids"] == want_new


def test_abort_update_ends_streams_in_flight_then_serves_new_weights(checkpoint_dir, greedy_old_new):
    old, new = greedy_old_new
    eng = AsyncRolloutEngine(model=str(checkpoint_dir("qwen3", 0)), **CONFIG)
    weights = new_weights(checkpoint_dir)
    try:
        streams, late = asyncio.run(streams_with_update(
            eng, lambda: eng.load_weights(weights, pause_mode="abort")))
        assert eng.engine.core.block_manager.num_free == len(eng.engine.core.block_manager.blocks)
    finally:
        asyncio.run(eng.shutdown())
    assert any(s["finish"] == "abort" for s in streams)
    for s, want_old in zip(streams, old):
        assert set(s["versions"]) <= {0} and s["token_ids"] == want_old[:len(s["token_ids"])]
        assert s["finish"] == ("abort" if len(s["token_ids"]) < 24 else "length")
    for s, want_new in zip(late, new):
        assert s["versions"] == [1] * 24 and s["token_ids"] == want_new


def test_wait_update_over_gloo_lets_streams_finish_and_holds_new_ones(checkpoint_dir, greedy_old_new, trainer):
    from sync_helpers import connect

    old, new = greedy_old_new
    eng = AsyncRolloutEngine(model=str(checkpoint_dir("qwen3", 0)), **CONFIG)
    connect(trainer, eng.engine)

    async def update():
        send = asyncio.to_thread(trainer.call, "send", weights={"checkpoint": str(checkpoint_dir("qwen3", 1))},
                                 version=1)
        result = await asyncio.gather(send, eng.update_weights(None, pause_mode="wait"))
        assert result[1] == 1 and eng.weight_version == 1

    try:
        streams, late = asyncio.run(streams_with_update(eng, update))
    finally:
        asyncio.run(eng.shutdown())
    for s, want_old in zip(streams, old):
        assert s["versions"] == [0] * 24 and s["token_ids"] == want_old and s["finish"] == "length"
    for s, want_new in zip(late, new):
        assert s["versions"] == [1] * 24 and s["token_ids"] == want_new


def test_pause_keep_then_resume_continues_the_streams(checkpoint_dir, greedy_old_new):
    old, _ = greedy_old_new
    eng = AsyncRolloutEngine(model=str(checkpoint_dir("qwen3", 0)), **CONFIG)

    async def pause_and_resume():
        await eng.pause_generation("keep")
        running = eng.engine.core.scheduler.running
        assert running and all(s.num_output < 24 for s in running)  # kept mid-sample
        with pytest.raises(EnginePausedError, match="paused"):
            await eng.generate(PROMPTS[0], GREEDY, wait=False)
        await eng.resume_generation()

    try:
        streams, late = asyncio.run(streams_with_update(eng, pause_and_resume))
    finally:
        asyncio.run(eng.shutdown())
    for s, want in zip(streams + late, old + old[:10]):
        assert s["token_ids"] == want and s["versions"] == [0] * 24


# ----------------------------------------------------------------------------------------------------------
# Cancellation, the event loop, bad input
# ----------------------------------------------------------------------------------------------------------


def test_cancelling_the_consumer_aborts_and_frees_the_blocks(engine):
    core = engine.engine.core
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def main():
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate_stream(PROMPTS[3], long, request_id="gone"):
                started.set()

        task = asyncio.ensure_future(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the abort lands at the next step boundary; afterwards the id is free again and no block is held
        out = await engine.generate(PROMPTS[3], GREEDY, request_id="gone")
        assert out.samples[0].finish_reason == "length"
        assert not await engine.abort("gone")

    asyncio.run(main())
    assert core.block_manager.num_free == len(core.block_manager.blocks) and not core.has_work()


def test_event_loop_lag_stays_small_while_the_engine_runs_flat_out(engine):
    params = SamplingParams(temperature=1.0, max_tokens=64, ignore_eos=True, logprobs=True)

    async def main():
        lags = []
        work = asyncio.ensure_future(asyncio.gather(*(engine.generate(p, params) for p in PROMPTS[:64])))
        while not work.done():
            start = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - start - 0.005)
        await work
        return lags

    lags = asyncio.run(main())
    assert len(lags) > 20
    p95 = sorted(lags)[int(0.95 * len(lags))]
    assert p95 < 0.020, f"event-loop lag p95 {p95 * 1e3:.1f} ms (median {statistics.median(lags) * 1e3:.1f} ms)"


def test_bad_input_gets_a_specific_error_and_the_engine_keeps_serving(engine):
    async def main():
        with pytest.raises(InvalidRequestError, match="token ids must be in"):
            await engine.generate([5, 10**9], GREEDY)
        with pytest.raises(InvalidRequestError, match="request_id must be a non-empty string"):
            await engine.generate([5, 6], GREEDY, request_id="")
        with pytest.raises(InvalidRequestError, match="n must be 1"):
            await engine.generate([5, 6], GREEDY.model_copy(update={"n": 2}), partial=PartialSample(token_ids=[4]))
        with pytest.raises(InvalidRequestError, match="partial logprobs has 2 entries for 1 tokens"):
            await engine.generate([5, 6], GREEDY, partial=PartialSample(token_ids=[4], logprobs=[-1.0, -2.0]))
        first = asyncio.ensure_future(engine.generate(PROMPTS[1], SamplingParams(max_tokens=200, ignore_eos=True),
                                                      request_id="dup"))
        await asyncio.sleep(0)
        with pytest.raises(InvalidRequestError, match="'dup' is already in flight"):
            await engine.generate(PROMPTS[2], GREEDY, request_id="dup")
        assert len((await first).samples[0].token_ids) == 200  # the first "dup" was not disturbed
        assert not await engine.abort("never-seen")
        return await engine.generate(PROMPTS[0], GREEDY)

    assert asyncio.run(main()).samples[0].finish_reason == "length"


def test_generate_after_shutdown_is_a_clear_error(checkpoint_dir):
    eng = AsyncRolloutEngine(model=str(checkpoint_dir("qwen3", 0)), **CONFIG)

    async def main():
        await eng.shutdown()
        with pytest.raises(EngineClosedError, match="shut down"):
            await eng.generate([5, 6], GREEDY)
        with pytest.raises(EngineClosedError, match="shut down"):
            async for _ in eng.generate_stream([5, 6], GREEDY):
                pass

    asyncio.run(main())


def test_kept_requests_survive_sleep_and_a_wait_update_while_asleep(checkpoint_dir, greedy_old_new):
    """pause(keep) -> sleep -> resume -> wake the weights -> a "wait" update while the KV cache still sleeps lands
    at once (nothing in flight can progress) -> wake_up: the kept streams are recomputed from their tokens and
    finish on the new weights."""
    old, _ = greedy_old_new
    eng = AsyncRolloutEngine(model=str(checkpoint_dir("qwen3", 0)), enable_sleep_mode=True, **CONFIG)
    weights = new_weights(checkpoint_dir)

    async def cycle():
        await eng.pause_generation("keep")
        await eng.sleep(1)
        await eng.resume_generation()
        await eng.wake_up(["weights"])
        assert await asyncio.wait_for(eng.load_weights(weights, pause_mode="wait"), 60) == 1
        await eng.wake_up()

    try:
        streams, late = asyncio.run(streams_with_update(eng, cycle))
    finally:
        asyncio.run(eng.shutdown())
    switched = 0
    for s, want_old in zip(streams, old):
        k = split_versions(s)
        assert s["finish"] == "length" and len(s["token_ids"]) == 24 and s["token_ids"][:k] == want_old[:k]
        switched += 0 < k < 24
    assert switched > 0
    assert all(s["versions"] == [1] * 24 for s in late)
