"""executor="ray" on a local Ray cluster (CPU): data and tensor parallelism, weight updates, a dead actor."""

import time

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("local_ray")

from rollout import CheckpointError, ReplicaError, RolloutEngine, SamplingParams, TransferInitInfo, run_together  # noqa: E402
from checkpoints import load_reference  # noqa: E402
from trainer_adapters import WeightSender  # noqa: E402

PROMPTS = [[4, 8, 15, 16, 23, 42], [99] * 9, [7], [3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1, 8]]
SEEDED = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, logprobs=True, n=2, seed=11)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
CONFIG = dict(device="cpu", num_kv_blocks=64, block_size=8)


def tokens(outs):
    return [[s.token_ids for s in o.samples] for o in outs]


def created_groups() -> set[str]:
    return {group_id for group_id, group in ray.util.placement_group_table().items() if group["state"] == "CREATED"}


def holds_resources(group_id: str) -> bool:
    """Whether the cluster still reserves a placement group's bundles (listed as resources like CPU_group_<id>)."""
    return any(name.endswith(group_id) for name in ray.cluster_resources())


def wait_until(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up after {timeout_s}s waiting for {what}"
        time.sleep(0.05)


def test_data_parallel_matches_one_process(checkpoint_dir):
    path = str(checkpoint_dir("qwen3"))
    local = RolloutEngine(model=path, **CONFIG)
    engine = RolloutEngine(model=path, executor="ray", data_parallel_size=2, **CONFIG)
    single = RolloutEngine(model=path, executor="ray", data_parallel_size=1, **CONFIG)
    try:
        for params in (SEEDED, GREEDY):
            outs = engine.generate(PROMPTS, params)
            assert tokens(outs) == tokens(local.generate(PROMPTS, params, use_tqdm=False))
        assert [o.request_id for o in outs] == [str(i) for i in range(5, 10)]
        with pytest.raises(CheckpointError, match=r"entry 0 \(model.norm.weight\): got numpy.ndarray"):
            engine.load_weights({"model.norm.weight": np.ones(64, dtype=np.float32)})  # refused before sending
        with pytest.raises(ValueError, match="version must be an int"):
            engine.load_weights({"model.norm.weight": torch.ones(64)}, version="5")
        assert engine.weight_version == 0 and tokens(engine.generate(PROMPTS, GREEDY)) == tokens(
            local.generate(PROMPTS, GREEDY, use_tqdm=False))
        unseeded = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
        again = RolloutEngine(model=path, **CONFIG)  # a fresh engine with the same seed draws the same seeds
        assert tokens(single.generate(PROMPTS, unseeded)) == tokens(again.generate(PROMPTS, unseeded, use_tqdm=False))
    finally:
        engine.shutdown()
        single.shutdown()


def test_tensor_parallel_actors_match_one_process(checkpoint_dir):
    path = str(checkpoint_dir("llama3"))
    before = created_groups()
    engine = RolloutEngine(model=path, executor="ray", tensor_parallel_size=2, **CONFIG)
    (group,) = created_groups() - before  # the engine's own; other tests' groups may still be going away
    assert holds_resources(group)
    try:
        local = RolloutEngine(model=path, **CONFIG)
        assert tokens(engine.generate(PROMPTS, GREEDY)) == tokens(local.generate(PROMPTS, GREEDY, use_tqdm=False))
        scored = SamplingParams(max_tokens=0, prompt_logprobs=1)  # prompt scoring through the rank actors
        for got, want in zip(engine.generate(PROMPTS, scored), local.generate(PROMPTS, scored, use_tqdm=False)):
            assert [list(t) for t in got.prompt_top_logprobs] == [list(t) for t in want.prompt_top_logprobs]
            assert got.prompt_logprobs == pytest.approx(want.prompt_logprobs, abs=1e-4)
            assert len(got.prompt_logprobs) == len(got.prompt_token_ids) - 1
        with pytest.raises(ValueError, match="pause_mode='keep' needs tensor_parallel_size=1"):
            engine.update_weights(pause_mode="keep")
    finally:
        engine.shutdown()
    wait_until(lambda: not holds_resources(group), "the engine's placement group to be freed")


def test_weight_update_reaches_every_worker_and_dead_actor_recovers(checkpoint_dir):
    old, new = str(checkpoint_dir("qwen3", 0)), str(checkpoint_dir("qwen3", 1))
    engine = RolloutEngine(model=old, executor="ray", data_parallel_size=2, **CONFIG)
    expected = tokens(RolloutEngine(model=new, **CONFIG).generate(PROMPTS, GREEDY, use_tqdm=False))
    trainer = load_reference(new)

    def sync(version):
        info = TransferInitInfo.local("gloo", world_size=1 + engine.num_workers, timeout_s=60)
        sender, _ = run_together(lambda: WeightSender(info), lambda: engine.init_weight_transfer(info))
        run_together(lambda: sender.send(trainer, version=version), lambda: engine.update_weights())
        sender.close()

    try:
        sync(version=1)
        assert engine.replica_versions == [1, 1] and engine.weight_version == 1
        assert tokens(engine.generate(PROMPTS, GREEDY)) == expected
        ray.kill(engine.replicas[1][0])
        with pytest.raises(ReplicaError, match="replica 1 lost an actor"):
            engine.generate(PROMPTS, GREEDY)
        assert tokens(engine.generate(PROMPTS, GREEDY)) == expected  # replica 0 alone
        engine.restart_replica(1)  # restored from replica 0
        assert engine.replica_versions == [1, 1]
        assert tokens(engine.generate(PROMPTS, GREEDY)) == expected
        sync(version=2)
        assert engine.replica_versions == [2, 2]
        assert tokens(engine.generate(PROMPTS, GREEDY)) == expected
    finally:
        engine.shutdown()


def test_async_replicas_stream_like_one_process_abort_and_update(checkpoint_dir):
    """AsyncRolloutEngine(executor="ray"): concurrent streams over two replicas equal one process's generate;
    abort ends a stream mid-way; load_weights reaches both replicas."""
    import asyncio

    from rollout import AsyncRolloutEngine, PartialSample
    from safetensors.torch import load_file

    old, new = str(checkpoint_dir("qwen3", 0)), str(checkpoint_dir("qwen3", 1))
    params = [SEEDED.model_copy(update={"seed": 20 + i}) for i in range(len(PROMPTS))] * 2
    prompts = PROMPTS * 2
    expected = RolloutEngine(model=old, **CONFIG).generate(prompts, params, use_tqdm=False)
    expected_new = tokens(RolloutEngine(model=new, **CONFIG).generate(PROMPTS, GREEDY, use_tqdm=False))
    engine = AsyncRolloutEngine(model=old, executor="ray", data_parallel_size=2, **CONFIG)
    long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True, logprobs=True)

    async def stream(prompt, p):
        got: dict[int, list[int]] = {}
        async for delta in engine.generate_stream(prompt, p):
            got.setdefault(delta.index, []).extend(delta.token_ids)
        return [got[i] for i in sorted(got)]

    async def main():
        streams = await asyncio.gather(*(stream(p, s) for p, s in zip(prompts, params)))
        assert streams == tokens(expected)
        outs = []
        async for delta in engine.generate_stream(PROMPTS[0], long, request_id="cut"):
            outs.append(delta)
            if len(outs) == 1:
                assert await engine.abort("cut")
        assert outs[-1].finish_reason == "abort" and sum(len(d.token_ids) for d in outs) < 100
        partial = PartialSample(token_ids=[t for d in outs for t in d.token_ids],
                                logprobs=[x for d in outs for x in d.logprobs])
        whole = await engine.generate(PROMPTS[0], long)
        rest = long.model_copy(update={"max_tokens": 100 - len(partial.token_ids)})
        cont = await engine.generate(PROMPTS[0], rest, partial=partial)
        assert cont.samples[0].token_ids == whole.samples[0].token_ids
        assert await engine.load_weights(load_file(f"{new}/model.safetensors"), pause_mode="keep") == 1
        late = await asyncio.gather(*(engine.generate(p, GREEDY) for p in PROMPTS))
        assert tokens(late) == expected_new
        assert all(o.samples[0].token_weight_versions == [1] * 10 for o in late)

    try:
        asyncio.run(main())
    finally:
        asyncio.run(engine.shutdown())


def test_routed_experts_through_ray_actors(checkpoint_dir):
    """return_routed_experts over the Ray executors: tensor-parallel ranks (rank 0's outputs) and an async replica's
    stream deltas give the rows of one process."""
    import asyncio

    from rollout import AsyncRolloutEngine

    path = str(checkpoint_dir("qwen3-moe"))
    params = SEEDED.model_copy(update={"return_routed_experts": True})
    expected = RolloutEngine(model=path, **CONFIG).generate(PROMPTS, params, use_tqdm=False)
    engine = RolloutEngine(model=path, executor="ray", tensor_parallel_size=2, **CONFIG)
    try:
        got = engine.generate(PROMPTS, params, use_tqdm=False)
    finally:
        engine.shutdown()
    for g, w in zip(got, expected):
        for gs, ws in zip(g.samples, w.samples):
            assert gs.token_ids == ws.token_ids and np.array_equal(gs.routed_experts, ws.routed_experts)
    engine = AsyncRolloutEngine(model=path, executor="ray", **CONFIG)

    async def main():
        rows: dict[int, list[np.ndarray]] = {}
        async for delta in engine.generate_stream(PROMPTS[0], params):
            rows.setdefault(delta.index, []).append(delta.routed_experts)
        await engine.shutdown()
        return rows

    for j, parts in asyncio.run(main()).items():
        np.testing.assert_array_equal(np.concatenate(parts), expected[0].samples[j].routed_experts)
