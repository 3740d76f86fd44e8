"""Tensor parallelism on CPU: two rank processes (gloo) give the same outputs (and prompt scores) as one process."""

import multiprocessing as mp

import pytest
import torch

from rollout import RolloutEngine, SamplingParams
from weight_sync import free_port, new_secret
from worker.parallel import TensorParallelInit

PROMPTS = [[4, 8, 15, 16, 23, 42], [99] * 21, [7]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=True)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, ignore_eos=True, logprobs=True, n=2, seed=5)
SCORED = SamplingParams(max_tokens=0, prompt_logprobs=2)


def run(path, tensor_parallel=None, size=1):
    """Per output: (token ids, logprobs) of each sample; for SCORED prompts one pair (the top-2 token ids at each
    prompt position, the prompt logprobs)."""
    engine = RolloutEngine(model=str(path), device="cpu", num_kv_blocks=64, block_size=8,
                           tensor_parallel_size=size, tensor_parallel=tensor_parallel)
    outputs = [[(s.token_ids, s.logprobs) for s in o.samples]
               for params in (GREEDY, SAMPLED) for o in engine.generate(PROMPTS, params, use_tqdm=False)]
    return outputs + [[([list(top) for top in o.prompt_top_logprobs], o.prompt_logprobs)]
                      for o in engine.generate(PROMPTS, SCORED, use_tqdm=False)]


def tp_init(rank, port, secret, **fields):
    return TensorParallelInit(rank=rank, size=2, master_port=port, secret=secret, **{"timeout_s": 60, **fields})


def _rank(path, rank, port, secret, queue):
    import torch

    torch.set_num_threads(1)
    try:
        queue.put((rank, run(path, tp_init(rank, port, secret), 2)))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        queue.put((rank, exc))


@pytest.mark.parametrize("variant", ["qwen3", "llama3", "qwen2"])
def test_two_ranks_match_one(checkpoint_dir, variant):
    path = checkpoint_dir(variant)
    ctx = mp.get_context("spawn")
    queue, port, secret = ctx.Queue(), free_port(), new_secret()
    ranks = [ctx.Process(target=_rank, args=(path, r, port, secret, queue)) for r in range(2)]
    for p in ranks:
        p.start()
    results = dict(queue.get(timeout=120) for _ in ranks)
    for p in ranks:
        p.join(30)
    assert not any(isinstance(r, Exception) for r in results.values()), results
    expected = run(path)
    for rank in (0, 1):
        for got, want in zip(results[rank], expected):
            for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, want):
                assert tokens == want_tokens
                assert logprobs == pytest.approx(want_logprobs, abs=1e-4)


def test_tensor_parallel_size_needs_a_rank(checkpoint_dir):
    with pytest.raises(ValueError, match="one process per rank"):
        RolloutEngine(model=str(checkpoint_dir("qwen3")), device="cpu", tensor_parallel_size=2)


def test_heads_must_divide(checkpoint_dir):
    init = TensorParallelInit(rank=0, size=3, master_port=free_port(), timeout_s=5, secret=new_secret())
    with pytest.raises(Exception, match=r"tensor_parallel_size=3 must divide num_attention_heads \(4\)"):
        RolloutEngine(model=str(checkpoint_dir("qwen3")), device="cpu", tensor_parallel_size=3,
                      tensor_parallel=init)


def _rank_receiving(path, rank, port, secret, info, queue):
    import torch

    torch.set_num_threads(1)
    try:
        engine = RolloutEngine(model=str(path), device="cpu", num_kv_blocks=64, block_size=8, tensor_parallel_size=2,
                               tensor_parallel=tp_init(rank, port, secret))
        engine.init_weight_transfer(info)
        version = engine.update_weights()
        outs = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
        queue.put((rank, (version, [o.samples[0].token_ids for o in outs])))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        queue.put((rank, exc))


def rank_shards(engine, size):
    """Per-rank kernel-format shards of a one-process engine's parameters, cut here by hand (the reference)."""
    config = engine.worker.hf_config
    head_dim = config.head_dim
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shards = {}
    for name, tensor in engine.export_weights().items():
        if "qkv_proj" in name:
            parts = [p.chunk(size) for p in tensor.split([q, kv, kv])]
        elif "gate_up_proj" in name:
            parts = [p.chunk(size) for p in tensor.chunk(2)]
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            parts = [tensor.chunk(size, dim=1)]
        elif "embed_tokens" in name or "lm_head" in name:
            parts = [tensor.chunk(size)]
        else:
            parts = [[tensor] * size]
        for rank in range(size):
            shards[f"rank{rank}/{name}"] = torch.cat([p[rank] for p in parts]).contiguous()
    return shards


@pytest.mark.parametrize("fmt", ["checkpoint", "kernel"])
def test_update_reaches_every_rank(checkpoint_dir, fmt):
    """The trainer (this process) broadcasts full tensors, or every rank's kernel shards; each rank keeps its own."""
    from checkpoints import load_reference
    from trainer_adapters import TransferInitInfo, WeightSender

    old, new = checkpoint_dir("qwen3", 0), checkpoint_dir("qwen3", 1)
    fresh = RolloutEngine(model=str(new), device="cpu", num_kv_blocks=64)
    weights = load_reference(new) if fmt == "checkpoint" else rank_shards(fresh, 2)
    info = TransferInitInfo.local("gloo", world_size=3, timeout_s=60)
    ctx = mp.get_context("spawn")
    queue, port, secret = ctx.Queue(), free_port(), new_secret()
    ranks = [ctx.Process(target=_rank_receiving, args=(old, r, port, secret, info, queue)) for r in range(2)]
    for p in ranks:
        p.start()
    sender = WeightSender(info)
    sender.send(weights, version=4, bucket_bytes=8192, format=fmt)
    results = dict(queue.get(timeout=120) for _ in ranks)
    for p in ranks:
        p.join(30)
    sender.close()
    expected = [o.samples[0].token_ids for o in fresh.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert results == {0: (4, expected), 1: (4, expected)}
