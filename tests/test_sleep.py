"""Sleep / wake of the memory pool on CPU: outputs kept (level 1), refusals until weights return (level 2)."""

import threading
import time

import pytest
import torch

from checkpoints import load_reference
from rollout import EngineSleepingError, RolloutEngine, SamplingParams, WeightsInvalidError

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=True)
SEEDED = SamplingParams(n=2, temperature=1.0, top_k=20, max_tokens=10, ignore_eos=True, logprobs=True, seed=4)
PROMPTS = [list(range(20, 60)), [3, 1, 4, 1, 5]]


def make(path, **config):
    fields = dict(device="cpu", enable_sleep_mode=True, num_kv_blocks=64, max_model_len=256) | config
    return RolloutEngine(model=str(path), **fields)


def run(engine, params=GREEDY):
    return [[(s.token_ids, s.logprobs) for s in o.samples] for o in engine.generate(PROMPTS, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def path(checkpoint_dir):
    return checkpoint_dir("qwen3", seed=5)


def test_level1_round_trips_keep_outputs_and_views(path):
    """On CPU the arena's storage is resized to zero and back; every parameter stays a view of it."""
    engine = make(path)
    before, seeded = run(engine), run(engine, SEEDED)
    for _ in range(3):
        engine.sleep(level=1)
        report = engine.memory_report()
        assert not report.arenas["weights"].resident and report.arenas["weights"].mapped_bytes == 0
        assert engine.worker.pool.arenas["kv_cache"].data.untyped_storage().nbytes() == 0
        engine.wake_up()
        assert run(engine) == before and run(engine, SEEDED) == seeded
    arena = engine.worker.pool.arenas["weights"].data.untyped_storage()
    assert all(p.untyped_storage().data_ptr() == arena.data_ptr() for p in engine.worker.model.parameters())
    assert engine.memory_report().arenas["weights"].host_backup_bytes == engine.worker.pool.arenas["weights"].size


def test_generate_while_asleep_is_refused_then_works(path):
    engine = make(path)
    before = run(engine)
    engine.sleep(level=1)
    with pytest.raises(EngineSleepingError, match="asleep .*call wake_up"):
        run(engine)
    engine.wake_up(tags=["weights"])
    with pytest.raises(EngineSleepingError, match="kv_cache"):
        run(engine)
    engine.wake_up(tags=["kv_cache"])
    assert run(engine) == before


def test_level2_refuses_until_full_weights_arrive(path, checkpoint_dir):
    engine = make(path)
    other = load_reference(checkpoint_dir("qwen3", seed=6)).state_dict()
    engine.sleep(level=2)
    engine.sleep(level=2)
    engine.wake_up(tags=["weights"])
    with pytest.raises(EngineSleepingError):
        run(engine)
    engine.wake_up()
    with pytest.raises(WeightsInvalidError, match="not whole"):
        run(engine)
    names = list(other)
    engine.load_weights([(n, other[n]) for n in names[:5]])
    with pytest.raises(WeightsInvalidError):
        run(engine)
    engine.load_weights([(n, other[n]) for n in names[5:]])
    assert run(engine) == run(make(checkpoint_dir("qwen3", seed=6)))


def test_rl_pattern_wake_weights_load_then_wake_kv(path, checkpoint_dir):
    engine = make(path)
    run(engine)
    other = load_reference(checkpoint_dir("qwen3", seed=6)).state_dict()
    engine.sleep(level=1)
    with pytest.raises(EngineSleepingError, match="wake_up\\(tags=\\['weights'\\]\\)"):
        engine.load_weights(other.items())
    engine.wake_up(tags=["weights"])
    engine.load_weights(other.items())
    engine.wake_up(tags=["kv_cache"])
    assert run(engine) == run(make(checkpoint_dir("qwen3", seed=6)))
    assert engine.core.block_manager.num_hit_blocks == 0


def test_two_engines_sleep_independently(path):
    a, b = make(path), make(path)
    expected = run(b)
    a.sleep(level=2)
    assert run(b) == expected
    b.sleep(level=1)
    b.wake_up()
    assert run(b) == expected
    a.wake_up()
    with pytest.raises(WeightsInvalidError):
        run(a)


def test_rotary_tables_survive_both_levels(path):
    engine = make(path)
    rotary = engine.worker.model.model.layers[0].self_attn.rotary
    cos = rotary.cos.clone()
    engine.sleep(level=2)
    engine.wake_up()
    assert torch.equal(rotary.cos, cos)


def test_misuse_errors(path):
    engine = make(path)
    with pytest.raises(ValueError, match="sleep level must be 1 .* or 2"):
        engine.sleep(level=3)
    with pytest.raises(ValueError, match="unknown wake_up tags \\['gpu'\\]"):
        engine.wake_up(tags=["gpu"])
    engine.wake_up()
    plain = make(path, enable_sleep_mode=False)
    with pytest.raises(RuntimeError, match="enable_sleep_mode=True"):
        plain.sleep()


def test_sleep_refused_while_generate_runs(path):
    """sleep() lands between two steps; with requests still in flight there, it is refused."""
    engine = make(path)
    launch, started = engine.worker.launch, threading.Event()

    def slow(batch):  # the first step waits until sleep() has been asked for
        started.set()
        deadline = time.monotonic() + 30
        while not engine.loop.pending_commands() and time.monotonic() < deadline:
            time.sleep(0.001)
        engine.worker.launch = launch
        return launch(batch)

    engine.worker.launch = slow
    thread = threading.Thread(target=run, args=(engine,))
    thread.start()
    assert started.wait(30)
    with pytest.raises(RuntimeError, match="refused while requests are in flight"):
        engine.sleep()
    thread.join()
    engine.sleep()
    engine.wake_up()


def test_shutdown_frees_the_pool_and_refuses_work(path):
    engine = make(path)
    run(engine)
    weights = engine.worker.pool.arenas["weights"].data
    engine.shutdown()
    assert weights.untyped_storage().nbytes() == 0 and not engine.worker.pool.arenas
    with pytest.raises(RuntimeError, match="shut down"):
        run(engine)
