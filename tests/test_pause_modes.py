"""Updates arriving over gloo while generate() runs in another thread, under each pause mode."""

import threading
import time

import pytest

from rollout import SamplingParams
from sync_helpers import PROMPTS, connect, engine_for, greedy, sync

LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True, logprobs=True)


@pytest.fixture(scope="module")
def long_old(old_and_new):
    """Greedy LONG outputs of a fresh engine on the old checkpoint."""
    outs = engine_for(old_and_new[0]).generate(PROMPTS, LONG, use_tqdm=False)
    return [o.samples[0].token_ids for o in outs]


def hold_step_until_update_queued(engine):
    """Once a sample has 3 tokens, make the engine's next step wait until an update is queued, so it surely
    lands mid-generation. Returns the original `step`, to put back afterwards."""
    original, held_once = engine.core.step, []

    def held(queued):
        if not held_once and any(s.num_output >= 3 for s in engine.core.scheduler.running):
            held_once.append(True)
            deadline = time.monotonic() + 30
            while not engine.loop.pending_commands() and time.monotonic() < deadline:
                time.sleep(0.001)
        return original(queued)

    engine.core.step = held
    return original


def update_mid_generation(trainer, engine, new, mode):
    """Run a LONG generate in a thread and send an update after its 3rd token, mid-generation; return its samples."""
    original = hold_step_until_update_queued(engine)
    result = {}
    thread = threading.Thread(target=lambda: result.update(outs=engine.generate(PROMPTS, LONG, use_tqdm=False)))
    thread.start()
    deadline = time.monotonic() + 30
    while not any(s.num_output >= 3 for s in list(engine.core.scheduler.running)):
        assert time.monotonic() < deadline, "generation did not start"
        time.sleep(0.0005)
    assert sync(trainer, engine, {"checkpoint": str(new)}, version=1, pause_mode=mode) == [1, 1]
    finished_when_update_returned = not thread.is_alive()
    thread.join(60)
    engine.core.step = original
    return [o.samples[0] for o in result["outs"]], finished_when_update_returned


def test_keep_continues_on_new_weights_and_stamps_each_token(trainer, old_and_new, long_old):
    old, new, _, expected_new = old_and_new
    engine = engine_for(old)
    connect(trainer, engine)
    samples, _ = update_mid_generation(trainer, engine, new, "keep")
    for sample, reference in zip(samples, long_old):
        assert sample.finish_reason == "length" and len(sample.token_ids) == LONG.max_tokens
        versions = sample.token_weight_versions
        switch = versions.index(1)
        assert switch >= 3 and versions == [0] * switch + [1] * (len(versions) - switch)
        assert sample.token_ids[:switch] == reference[:switch]
        assert sample.weight_version == 0
    assert engine.weight_version == 1 and greedy(engine) == expected_new


def test_abort_returns_partial_samples_then_updates(trainer, old_and_new, long_old):
    old, new, _, expected_new = old_and_new
    engine = engine_for(old)
    connect(trainer, engine)
    samples, _ = update_mid_generation(trainer, engine, new, "abort")
    for sample, reference in zip(samples, long_old):
        assert sample.finish_reason == "abort"
        assert 3 <= len(sample.token_ids) < LONG.max_tokens
        assert sample.token_ids == reference[: len(sample.token_ids)]
        assert len(sample.logprobs) == len(sample.token_ids)
        assert set(sample.token_weight_versions) == {0}
    assert engine.weight_version == 1 and greedy(engine) == expected_new


def test_wait_finishes_requests_in_flight_first(trainer, old_and_new, long_old):
    old, new, _, expected_new = old_and_new
    engine = engine_for(old)
    connect(trainer, engine)
    samples, finished = update_mid_generation(trainer, engine, new, "wait")
    assert finished
    assert [s.token_ids for s in samples] == long_old
    assert all(set(s.token_weight_versions) == {0} and s.finish_reason == "length" for s in samples)
    assert engine.weight_version == 1 and greedy(engine) == expected_new
