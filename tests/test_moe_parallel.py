"""MoE models split over two rank processes (gloo, CPU): tensor-parallel experts and expert parallelism give the
outputs of one process, and a checkpoint-format update from a trainer lands on each rank's experts."""

import multiprocessing as mp

import pytest

from rollout import RolloutEngine, SamplingParams
from weight_sync import free_port, new_secret
from worker.parallel import TensorParallelInit

PROMPTS = [[4, 8, 15, 16, 23, 42], [99] * 21, [7]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=True)
SAMPLED = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, logprobs=True, n=2, seed=5)


def outputs(engine):
    return [[(s.token_ids, s.logprobs) for s in o.samples]
            for params in (GREEDY, SAMPLED) for o in engine.generate(PROMPTS, params, use_tqdm=False)]


def engine_for(path, rank=None, port=None, secret=None, ep=1):
    tp = None if rank is None else TensorParallelInit(rank=rank, size=2, master_port=port, secret=secret, timeout_s=60)
    return RolloutEngine(model=str(path), device="cpu", num_kv_blocks=64, block_size=8, tensor_parallel=tp,
                         tensor_parallel_size=1 if tp is None else 2, expert_parallel_size=ep)


def _rank(path, rank, port, secret, ep, info, queue):
    import torch

    torch.set_num_threads(1)
    try:
        engine = engine_for(path, rank, port, secret, ep)
        params = dict(engine.worker.model.named_parameters())
        result = {"shape": tuple(params["model.layers.0.mlp.experts.w13"].shape), "before": outputs(engine)}
        if info is not None:
            engine.init_weight_transfer(info)
            result["version"] = engine.update_weights()
            result["after"] = outputs(engine)
        queue.put((rank, result))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        queue.put((rank, exc))


def run_ranks(path, ep, info=None, send=None):
    ctx = mp.get_context("spawn")
    queue, port, secret = ctx.Queue(), free_port(), new_secret()
    ranks = [ctx.Process(target=_rank, args=(path, r, port, secret, ep, info, queue)) for r in range(2)]
    for p in ranks:
        p.start()
    if send is not None:
        send()
    results = dict(queue.get(timeout=180) for _ in ranks)
    for p in ranks:
        p.join(30)
    assert not any(isinstance(r, Exception) for r in results.values()), results
    return results


def assert_same(got, want):
    for got_prompt, want_prompt in zip(got, want):
        for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got_prompt, want_prompt):
            assert tokens == want_tokens
            assert logprobs == pytest.approx(want_logprobs, abs=1e-4)


def test_tensor_parallel_experts_match_one_process(checkpoint_dir):
    """Every rank holds all 8 experts with half of the intermediate dimension (and half the shared expert)."""
    path = checkpoint_dir("qwen2-moe")
    results = run_ranks(path, ep=1)
    expected = outputs(engine_for(path))
    for rank in (0, 1):
        assert results[rank]["shape"] == (8, 32, 64)  # 2 * moe_intermediate_size / 2
        assert_same(results[rank]["before"], expected)


def test_expert_parallel_matches_one_process_and_takes_updates(checkpoint_dir):
    """EP=2: each rank holds 4 whole experts; a trainer's transformers model (stacked expert tensors) sent in
    checkpoint format lands on both ranks' experts and gives a fresh engine's outputs on the new weights."""
    from checkpoints import load_reference
    from trainer_adapters import TransferInitInfo, WeightSender

    old, new = checkpoint_dir("qwen3-moe", 0), checkpoint_dir("qwen3-moe", 1)
    info = TransferInitInfo.local("gloo", world_size=3, timeout_s=60)
    senders = []

    def send():
        sender = WeightSender(info)
        sender.send(load_reference(new), version=2, bucket_bytes=16384)
        senders.append(sender)

    results = run_ranks(old, ep=2, info=info, send=send)
    senders[0].close()
    expected_old, expected_new = outputs(engine_for(old)), outputs(engine_for(new))
    for rank in (0, 1):
        assert results[rank]["shape"] == (4, 64, 64)  # 8 experts / 2, whole intermediate dimension
        assert results[rank]["version"] == 2
        assert_same(results[rank]["before"], expected_old)
        assert_same(results[rank]["after"], expected_new)
