"""executor="ray" on a local Ray cluster (CPU): data and tensor parallelism, weight updates, a dead actor."""

import time

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("local_ray")

from rollout import ReplicaError, RolloutEngine, SamplingParams, TransferInitInfo, run_together  # noqa: E402
from checkpoints import load_reference  # noqa: E402
from trainer_adapters import WeightSender  # noqa: E402

PROMPTS = [[4, 8, 15, 16, 23, 42], [99] * 9, [7], [3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1, 8]]
SEEDED = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, logprobs=True, n=2, seed=11)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
CONFIG = dict(device="cpu", num_kv_blocks=64, block_size=8)


def tokens(outs):
    return [[s.token_ids for s in o.samples] for o in outs]


def test_data_parallel_matches_one_process(checkpoint_dir):
    path = str(checkpoint_dir("qwen3"))
    local = RolloutEngine(model=path, **CONFIG)
    engine = RolloutEngine(model=path, executor="ray", data_parallel_size=2, **CONFIG)
    try:
        for params in (SEEDED, GREEDY):
            outs = engine.generate(PROMPTS, params)
            assert tokens(outs) == tokens(local.generate(PROMPTS, params, use_tqdm=False))
        assert [o.request_id for o in outs] == [str(i) for i in range(5, 10)]
        unseeded = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
        again = RolloutEngine(model=path, **CONFIG)  # a fresh engine with the same seed draws the same seeds
        assert tokens(RolloutEngine(model=path, executor="ray", data_parallel_size=1, **CONFIG).generate(
            PROMPTS, unseeded)) == tokens(again.generate(PROMPTS, unseeded, use_tqdm=False))
    finally:
        engine.shutdown()


def test_tensor_parallel_actors_match_one_process(checkpoint_dir):
    path = str(checkpoint_dir("llama3"))
    free = ray.available_resources()["CPU"]
    engine = RolloutEngine(model=path, executor="ray", tensor_parallel_size=2, **CONFIG)
    try:
        expected = RolloutEngine(model=path, **CONFIG).generate(PROMPTS, GREEDY, use_tqdm=False)
        assert tokens(engine.generate(PROMPTS, GREEDY)) == tokens(expected)
        with pytest.raises(ValueError, match="pause_mode='keep' needs tensor_parallel_size=1"):
            engine.update_weights(pause_mode="keep")
    finally:
        engine.shutdown()
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < free and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources()["CPU"] == free  # the engine's placement group was freed


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
