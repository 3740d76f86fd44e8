"""Weight sync over gloo between a trainer process and the engine (CPU, two processes)."""

import threading
import time

import pytest
import torch

from checkpoints import load_reference
from rollout import CheckpointError, TransferInitInfo, WeightsInvalidError, WeightTransferError, WeightUpdateRejected
from sync_helpers import GREEDY, PROMPTS, connect, engine_for, greedy, kernel_tensors, sync
from trainer_process import TrainerError, TrainerProcess

def test_full_update_gives_the_trainers_model(trainer, old_and_new):
    old, new, expected_old, expected_new = old_and_new
    engine = engine_for(old)
    connect(trainer, engine)
    sent, received = sync(trainer, engine, {"checkpoint": str(new)}, version=3, bucket_bytes=4096)
    assert (sent, received, engine.weight_version) == (3, 3, 3)
    outs = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.samples[0].token_ids for o in outs] == expected_new
    assert {v for o in outs for v in o.samples[0].token_weight_versions} == {3}
    assert outs[0].samples[0].weight_version == 3
    reference = engine_for(new).generate(PROMPTS, GREEDY, use_tqdm=False)
    for out, ref in zip(outs, reference):
        assert out.samples[0].logprobs == pytest.approx(ref.samples[0].logprobs, abs=1e-5)


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_wrapped_trainer_models_send_checkpoint_names(trainer, old_and_new, wrap):
    old, new, _, expected_new = old_and_new
    engine = engine_for(old)
    connect(trainer, engine)
    sent, received = sync(trainer, engine, {"checkpoint": str(new), "wrap": wrap}, version=1, bucket_bytes=8192)
    assert (sent, received) == (1, 1)
    assert greedy(engine) == expected_new


def test_partial_update_changes_only_those_tensors(trainer, old_and_new):
    old, new, expected_old, _ = old_and_new
    names = ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight", "model.norm.weight"]
    engine = engine_for(old)
    connect(trainer, engine)
    sync(trainer, engine, {"checkpoint": str(new), "names": names}, version=1, partial=True)
    params = dict(load_reference(new).named_parameters())
    reference = engine_for(old)
    reference.load_weights([(name, params[name]) for name in names])
    assert greedy(engine) == greedy(reference) != expected_old


def test_kernel_format_whole_arena_and_reordered(trainer, old_and_new):
    old, new, _, expected_new = old_and_new
    tensors = kernel_tensors(engine_for(new))
    engine = engine_for(old)
    connect(trainer, engine)
    sync(trainer, engine, {"tensors": tensors}, version=1, format="kernel", bucket_bytes=8192)
    assert greedy(engine) == expected_new
    engine = engine_for(old)
    connect(trainer, engine)
    reordered = dict(reversed(list(tensors.items())))
    sync(trainer, engine, {"tensors": reordered}, version=1, format="kernel", bucket_bytes=8192)
    assert greedy(engine) == expected_new


def test_bad_updates_are_refused_on_both_sides(trainer, old_and_new):
    old, new, expected_old, expected_new = old_and_new
    engine = engine_for(old)
    connect(trainer, engine)
    ckpt = {"checkpoint": str(new)}
    cases = [
        ({"tensors": {"model.layers.0.mlp.bogus.weight": torch.randn(4, 4)}}, dict(partial=True), "unexpected"),
        ({"checkpoint": str(new), "names": ["model.norm.weight"]}, {}, "missing"),
        ({"tensors": {"model.norm.weight": torch.randn(65)}}, dict(partial=True), "expected shape [64]"),
        ({"tensors": kernel_tensors(engine_for(new))}, {}, "unexpected"),  # kernel names announced as checkpoint format
        (ckpt, dict(format="kernel"), "unexpected"),  # checkpoint names announced as kernel format
    ]
    for weights, options, reason in cases:
        sent, received = sync(trainer, engine, weights, version=2, **options)
        assert isinstance(received, WeightUpdateRejected) and reason in str(received)
        assert isinstance(sent, TrainerError) and sent.kind == "WeightUpdateRejected" and reason in sent.message
        assert engine.weight_version == 0 and greedy(engine) == expected_old
    sent, received = sync(trainer, engine, {"tensors": {"model.norm.weight": torch.arange(64)}}, version=2,
                          partial=True)
    assert isinstance(sent, TrainerError) and sent.kind == "ValueError" and "floating dtype" in sent.message
    assert isinstance(received, WeightUpdateRejected) and "gave up on its update" in str(received)
    assert "floating dtype" in str(received)
    announced = dict(version=9, bucket_bytes=4096)
    other = {"version": 8, "tensors": [{"name": "model.norm.weight", "dtype": "float32", "shape": [64]}]}
    sent, received = sync(trainer, engine, ckpt, engine_info=other, **announced)
    assert isinstance(received, WeightUpdateRejected) and "differs from what the trainer sent" in str(received)
    assert isinstance(sent, TrainerError) and "differs" in sent.message
    assert sync(trainer, engine, ckpt, version=2) == [2, 2]
    assert greedy(engine) == expected_new
    sent, received = sync(trainer, engine, {"checkpoint": str(old)}, version=2)
    assert isinstance(received, WeightUpdateRejected) and "not newer" in str(received)
    assert isinstance(sent, TrainerError) and "not newer" in sent.message
    assert greedy(engine) == expected_new


def test_killed_sender_leaves_engine_refusing_until_a_complete_update(trainer, old_and_new):
    old, new, _, expected_new = old_and_new
    engine = engine_for(old)
    doomed = TrainerProcess()
    try:
        connect(doomed, engine, timeout_s=4.0)
        doomed.call("load", weights={"checkpoint": str(new)})
        start = time.monotonic()
        sent, received = sync(doomed, engine, {"checkpoint": str(new)}, version=1, bucket_bytes=4096, die_after=5)
        elapsed = time.monotonic() - start
    finally:
        doomed.close()
    assert isinstance(received, WeightTransferError), received
    assert elapsed < 4.0 + 3.0
    with pytest.raises(WeightsInvalidError, match="half-written by a failed update"):
        engine.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert engine.weight_version == 0
    start = time.monotonic()
    with pytest.raises(WeightTransferError, match="broke in an earlier update .* join a new one"):
        engine.update_weights()  # said at once, not after a wait on a dead trainer
    assert time.monotonic() - start < 2.0
    connect(trainer, engine)
    assert sync(trainer, engine, {"checkpoint": str(new)}, version=1) == [1, 1]
    assert greedy(engine) == expected_new


def test_update_into_sleeping_weights_is_refused_then_rl_wake_pattern_works(trainer, old_and_new):
    old, new, _, expected_new = old_and_new
    engine = engine_for(old, enable_sleep_mode=True)
    connect(trainer, engine)
    engine.sleep(level=2)
    sent, received = sync(trainer, engine, {"checkpoint": str(new)}, version=1)
    assert isinstance(received, WeightUpdateRejected) and "wake_up(tags=['weights'])" in str(received)
    engine.wake_up(["weights"])
    assert sync(trainer, engine, {"checkpoint": str(new)}, version=1) == [1, 1]
    engine.wake_up(["kv_cache"])
    assert greedy(engine) == expected_new


def test_update_weights_needs_a_group(old_and_new):
    engine = engine_for(old_and_new[0])
    with pytest.raises(RuntimeError, match="init_weight_transfer"):
        engine.update_weights()
    with pytest.raises(ValueError, match="pause_mode"):
        engine.update_weights(pause_mode="later")


def test_update_nobody_received_is_skipped_by_the_next_one(trainer, old_and_new):
    old, new, _, expected_new = old_and_new
    engine = engine_for(old)
    connect(trainer, engine, timeout_s=2.0)
    with pytest.raises(TrainerError, match="WeightTransferError.*accept the update"):
        trainer.call("send", weights={"checkpoint": str(new)}, version=1)
    assert sync(trainer, engine, {"checkpoint": str(new)}, version=2) == [2, 2]
    assert greedy(engine) == expected_new


def test_export_and_import_between_engines(old_and_new, checkpoint_dir):
    old, new, _, expected_new = old_and_new
    donor, engine = engine_for(new), engine_for(old)
    assert engine.import_weights(donor.export_weights(), version=3) == 3
    assert engine.weight_version == 3 and greedy(engine) == expected_new
    other = engine_for(checkpoint_dir("llama3")).export_weights()
    with pytest.raises(CheckpointError, match="load_kernel_weights"):
        engine.import_weights(other, version=4)
    assert engine.weight_version == 3 and greedy(engine) == expected_new


def test_one_worker_refusing_calls_the_update_off_for_all(trainer, old_and_new):
    from rollout import TransferInitInfo, run_together

    old, new, expected_old, expected_new = old_and_new
    awake, sleeping = engine_for(old), engine_for(old, enable_sleep_mode=True)
    info = TransferInitInfo.local("gloo", world_size=3, timeout_s=20)
    run_together(lambda: trainer.call("init", **info.model_dump()),
                 lambda: awake.init_weight_transfer(info, worker_index=0),
                 lambda: sleeping.init_weight_transfer(info, worker_index=1))
    sleeping.sleep(level=1)

    def attempt(engine):
        def run():
            try:
                return engine.update_weights()
            except WeightUpdateRejected as exc:
                return exc
        return run

    outcome = run_together(lambda: _send_result(trainer, new, 1), attempt(awake), attempt(sleeping))
    assert isinstance(outcome[0], TrainerError) and "wake_up" in outcome[0].message
    assert isinstance(outcome[2], WeightUpdateRejected) and "wake_up" in str(outcome[2])
    assert isinstance(outcome[1], WeightUpdateRejected) and "called off" in str(outcome[1])
    assert awake.weight_version == 0 and greedy(awake) == expected_old  # nothing touched, still serving
    sleeping.wake_up()
    outcome = run_together(lambda: _send_result(trainer, new, 1), attempt(awake), attempt(sleeping))
    assert outcome == [1, 1, 1] and greedy(awake) == greedy(sleeping) == expected_new


def _send_result(trainer, checkpoint, version):
    try:
        return trainer.call("send", weights={"checkpoint": str(checkpoint)}, version=version)
    except TrainerError as exc:
        return exc


def test_trainer_that_stops_waiting_calls_the_update_off(trainer, old_and_new):
    """A 'wait' update held past the trainer's timeout by a long generate is called off, not half applied."""
    import threading

    from rollout import SamplingParams

    old, new, expected_old, expected_new = old_and_new
    engine = engine_for(old, num_decode_steps=1)  # one launch per step: the third one is held
    connect(trainer, engine, timeout_s=2.0)
    launch, calls = engine.worker.launch, [0]

    def slow(batch):
        calls[0] += 1
        if calls[0] == 3:
            time.sleep(3.5)  # longer than the trainer waits for the ack
        return launch(batch)

    engine.worker.launch = slow
    done = {}
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    thread = threading.Thread(target=lambda: done.update(outs=engine.generate(PROMPTS, params, use_tqdm=False)))
    thread.start()
    while calls[0] < 2:
        time.sleep(0.001)
    sent, received = sync(trainer, engine, {"checkpoint": str(new)}, version=1, pause_mode="wait")
    thread.join(30)
    engine.worker.launch = launch
    assert isinstance(sent, TrainerError) and sent.kind == "WeightTransferError"
    assert isinstance(received, WeightUpdateRejected) and "called off" in str(received)
    assert engine.weight_version == 0 and greedy(engine) == expected_old
    assert sync(trainer, engine, {"checkpoint": str(new)}, version=1) == [1, 1]
    assert greedy(engine) == expected_new


def test_killed_trainer_is_reported_as_gone_at_once(old_and_new):
    old, new, _, _ = old_and_new
    engine = engine_for(old)
    doomed = TrainerProcess()
    try:
        connect(doomed, engine, timeout_s=60.0)
        outcome = {}

        def wait_for_update():
            try:
                engine.update_weights()
            except Exception as exc:  # noqa: BLE001 - inspected below
                outcome["error"] = exc

        waiter = threading.Thread(target=wait_for_update)
        waiter.start()
        doomed.process.kill()
        start = time.monotonic()
        waiter.join(30)
    finally:
        doomed.close()
    assert time.monotonic() - start < 30  # long before the group's 60 s timeout
    message = str(outcome["error"])
    assert isinstance(outcome["error"], WeightTransferError)
    assert "lost the group after" in message and "the trainer's next update" in message
    assert "gave up" not in message


def test_nobody_listening_fails_within_the_timeout_without_native_traces(old_and_new, capfd):
    engine = engine_for(old_and_new[0])
    info = TransferInitInfo.local("gloo", timeout_s=2)
    start = time.monotonic()
    with pytest.raises(WeightTransferError, match=r"nobody accepted a connection at 127.0.0.1:\d+ .*gave up after 2s"):
        engine.init_weight_transfer(info)
    assert 1.9 < time.monotonic() - start < 8
    assert "frame #" not in capfd.readouterr().err


def test_trainer_learns_at_once_that_an_engine_worker_left():
    from trainer_adapters import WeightSender
    from weight_sync import Receiver, run_together

    info = TransferInitInfo.local("gloo", timeout_s=60)
    sender, receiver = run_together(lambda: WeightSender(info), lambda: Receiver(info, 0, torch.device("cpu")))
    outcome = {}

    def send():
        try:
            sender.send({"w": torch.randn(8, 8)}, version=1)
        except Exception as exc:  # noqa: BLE001 - inspected below
            outcome["error"] = exc

    thread = threading.Thread(target=send)
    thread.start()
    receiver.next_update()  # the update was announced; the worker goes away without answering
    receiver.close()
    start = time.monotonic()
    thread.join(30)
    sender.close()
    assert time.monotonic() - start < 30  # long before the group's 60 s timeout
    assert isinstance(outcome["error"], WeightTransferError)
    assert "rank(s) 1 left the group" in str(outcome["error"])
