"""Routed-expert replay end to end: `SamplingParams(return_routed_experts=True)` gives `Sample.routed_experts`
([prompt + output[:-1], MoE layers, top_k]) equal to transformers' router choices for those tokens, through every
way a token reaches the model (plain steps, chunked prefill, preemption, prefix-cache hits, shared prompt blocks of
n samples, decode rounds, continuations, stream deltas)."""

import asyncio
import random

import numpy as np
import pytest
import torch

from checkpoints import load_reference
from rollout import AsyncRolloutEngine, InvalidRequestError, PartialSample, RolloutEngine, SamplingParams
from trainer_adapters import replay_routing

CPU = dict(device="cpu", dtype="float32")
ROUTES = SamplingParams(temperature=1.0, seed=11, max_tokens=12, ignore_eos=True, logprobs=True,
                        return_routed_experts=True)


def prompts(count: int, seed: int = 0, low: int = 3, high: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(rng.randrange(low, high))] for _ in range(count)]


@pytest.fixture(scope="module")
def reference(checkpoint_dir):
    """Per variant: transformers' model and its router choices [tokens, MoE layers, top_k] for a token list."""
    models = {}

    def choices(variant: str, tokens: list[int]) -> np.ndarray:
        if variant not in models:
            models[variant] = load_reference(checkpoint_dir(variant))
        with torch.no_grad():
            logits = models[variant](torch.tensor([tokens]), output_router_logits=True).router_logits
        top_k = models[variant].config.num_experts_per_tok
        return torch.stack([torch.topk(torch.softmax(x.float(), -1), top_k, dim=-1).indices for x in logits],
                           1).numpy()

    choices.models = models
    return choices


def engine_for(checkpoint_dir, variant="qwen3-moe", **config):
    return RolloutEngine(model=str(checkpoint_dir(variant)), **{**CPU, "num_kv_blocks": 128, "block_size": 4,
                                                                   **config})


def assert_routes(reference, variant, prompt, sample):
    """The sample's rows are transformers' router choices for prompt + output[:-1]."""
    tokens = prompt + sample.token_ids
    rows = sample.routed_experts
    assert rows.dtype == np.int16 and rows.shape[0] == len(tokens) - 1
    np.testing.assert_array_equal(rows, reference(variant, tokens[:-1]))


@pytest.mark.parametrize("variant", ["qwen3-moe", "qwen2-moe"])
@pytest.mark.parametrize("decode_steps", [1, 4])
def test_routed_experts_equal_transformers_router_choices(checkpoint_dir, reference, variant, decode_steps):
    """Prompts of different lengths batched together, step by step and in decode rounds."""
    engine = engine_for(checkpoint_dir, variant, num_decode_steps=decode_steps)
    batch = prompts(4, seed=1)
    for prompt, out in zip(batch, engine.generate(batch, ROUTES, use_tqdm=False)):
        assert_routes(reference, variant, prompt, out.samples[0])
    plain = engine.generate(batch[:1], ROUTES.model_copy(update={"return_routed_experts": False}), use_tqdm=False)
    assert plain[0].samples[0].routed_experts is None


def test_chunked_prefill_and_preemption(checkpoint_dir, reference):
    """Prompts prefilled in chunks of 5 tokens, and a cache too small for all samples at once (preemption)."""
    engine = engine_for(checkpoint_dir, max_num_batched_tokens=5, num_kv_blocks=16, max_model_len=64,
                        enable_prefix_caching=False)
    batch = prompts(4, seed=2, low=10, high=20)
    outs = engine.generate(batch, ROUTES.model_copy(update={"max_tokens": 24}), use_tqdm=False)
    assert engine.core.scheduler.num_preemptions > 0
    for prompt, out in zip(batch, outs):
        assert_routes(reference, "qwen3-moe", prompt, out.samples[0])


@pytest.mark.parametrize("caching", [True, False])
def test_prefix_cache_hits_and_n_samples_sharing_prompt_blocks(checkpoint_dir, reference, caching):
    """n=4 samples share the prompt's blocks (their rows come with the blocks); with caching, a later request
    with the same prompt matches the blocks and gets their rows, but blocks computed without rows are
    recomputed."""
    engine = engine_for(checkpoint_dir, enable_prefix_caching=caching)
    prompt = prompts(1, seed=3, low=22, high=23)[0]
    for sample in engine.generate([prompt], ROUTES.model_copy(update={"n": 4}), use_tqdm=False)[0].samples:
        assert_routes(reference, "qwen3-moe", prompt, sample)
    assert engine.core.block_manager.num_hit_blocks >= 3 * 5  # three samples matched the prompt's 5 full blocks
    if not caching:
        return
    other = prompts(1, seed=4, low=22, high=23)[0]
    engine.generate([other], ROUTES.model_copy(update={"return_routed_experts": False}), use_tqdm=False)
    for p in (prompt, other):  # rows from the blocks; none for the other prompt's blocks: computed again
        hits = engine.core.block_manager.num_hit_blocks
        assert_routes(reference, "qwen3-moe", p, engine.generate([p], ROUTES, use_tqdm=False)[0].samples[0])
        assert (engine.core.block_manager.num_hit_blocks > hits) == (p is prompt)


def test_returned_rows_replay_to_the_engines_logprobs(checkpoint_dir):
    """`trainer_adapters.replay_routing` with Sample.routed_experts: transformers' logprobs of the completion
    (a forward over prompt + output[:-1]) equal the engine's."""
    engine = engine_for(checkpoint_dir)
    prompt = prompts(1, seed=5)[0]
    params = ROUTES.model_copy(update={"logprobs_mode": "raw", "max_tokens": 16})
    sample = engine.generate([prompt], params, use_tqdm=False)[0].samples[0]
    model = load_reference(checkpoint_dir("qwen3-moe"))
    tokens = prompt + sample.token_ids
    with replay_routing(model, sample.routed_experts), torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([tokens[:-1]])).logits[0].float(), -1)
    replayed = [logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(sample.token_ids)]
    assert replayed == pytest.approx(sample.logprobs, abs=1e-4)


def test_stream_deltas_and_continuations(checkpoint_dir, reference):
    """A stream's deltas concatenate to the sample's rows; a continued sample returns the rows of prompt + all
    its tokens (the earlier sample's given rows, or its own when the partial sample carries none)."""
    engine = AsyncRolloutEngine(model=str(checkpoint_dir("qwen3-moe")), **CPU, num_kv_blocks=128, block_size=4,
                                num_decode_steps=3)
    prompt = prompts(1, seed=6)[0]

    async def run():
        deltas = [d async for d in engine.generate_stream(prompt, ROUTES, request_id="s")]
        whole = await engine.generate(prompt, ROUTES)
        first = await engine.generate(prompt, ROUTES.model_copy(update={"max_tokens": 5}))
        rest = ROUTES.model_copy(update={"max_tokens": 7})
        given = await engine.generate(prompt, rest, partial=PartialSample.of(first.samples[0]))
        bare = PartialSample.of(first.samples[0]).model_copy(update={"routed_experts": None})
        recomputed = await engine.generate(prompt, rest, partial=bare)
        await engine.shutdown()
        return deltas, whole.samples[0], given.samples[0], recomputed.samples[0]

    deltas, whole, given, recomputed = asyncio.run(run())
    assert [len(d.routed_experts) for d in deltas][0] == len(prompt)  # the first token comes with the prompt's
    np.testing.assert_array_equal(np.concatenate([d.routed_experts for d in deltas]), whole.routed_experts)
    assert_routes(reference, "qwen3-moe", prompt, whole)
    for sample in (given, recomputed):
        assert sample.token_ids == whole.token_ids  # same seed: the uninterrupted sample
        assert_routes(reference, "qwen3-moe", prompt, sample)


def test_bad_routed_experts_requests(checkpoint_dir):
    dense = RolloutEngine(model=str(checkpoint_dir("qwen3")), **CPU, num_kv_blocks=64)
    with pytest.raises(InvalidRequestError, match="return_routed_experts=True needs a mixture-of-experts model"):
        dense.generate([[1, 2, 3]], ROUTES, use_tqdm=False)
    engine = AsyncRolloutEngine(model=str(checkpoint_dir("qwen3-moe")), **CPU, num_kv_blocks=64)
    rows = np.zeros((3, 2, 2), dtype=np.int16)  # prompt 3 + 1 earlier token - 1 = 3 rows

    async def continue_with(routes):
        partial = PartialSample(token_ids=[7], logprobs=[-1.0], routed_experts=routes)
        return await engine.generate([1, 2, 3], ROUTES.model_copy(update={"max_tokens": 2}), partial=partial)

    async def run():
        got = (await continue_with(rows + 1)).samples[0].routed_experts
        assert len(got) == 3 + 2 and np.array_equal(got[:3], rows + 1)  # the given rows are kept
        with pytest.raises(InvalidRequestError, match=r"must be \[prompt \+ token_ids\[:-1\] = 3, 2, 2\]"):
            await continue_with(rows[:2])
        with pytest.raises(InvalidRequestError, match="outside 0..7"):
            await continue_with(rows + 8)
        await engine.shutdown()

    asyncio.run(run())
    with pytest.raises(ValueError, match="integer expert ids"):
        PartialSample(token_ids=[7], routed_experts=[[1, 2]])


@pytest.mark.gpu
def test_routed_experts_from_cuda_graphs_and_rounds(checkpoint_dir, reference):
    """On the GPU (fp32): decode steps replayed from CUDA graphs, in rounds queued ahead, return the rows
    transformers' router chooses."""
    engine = RolloutEngine(model=str(checkpoint_dir("qwen3-moe")), device="cuda", dtype="float32",
                           num_kv_blocks=256, block_size=16, num_decode_steps=4)
    assert engine.worker.runner.graphs is not None and engine.worker.runner.graphs.routes is not None
    batch = prompts(8, seed=7)
    outs = engine.generate(batch, ROUTES.model_copy(update={"max_tokens": 20}), use_tqdm=False)
    for prompt, out in zip(batch, outs):
        assert_routes(reference, "qwen3-moe", prompt, out.samples[0])


def test_generate_route_returns_routed_experts(checkpoint_dir, reference):
    """`POST /generate` with return_routed_experts: base64 int16 rows, whole or streamed, equal the engine's; a
    partial sample may carry them back in the same form."""
    import base64
    import json

    import httpx
    from serve_helpers import LiveServer

    def decode(d):
        return np.frombuffer(base64.b64decode(d["data"]), "<i2").reshape(d["shape"])

    server = LiveServer(AsyncRolloutEngine(model=str(checkpoint_dir("qwen3-moe")), **CPU, num_kv_blocks=64))
    try:
        prompt = prompts(1, seed=8)[0]
        params = dict(max_tokens=6, seed=2, ignore_eos=True, return_routed_experts=True)
        body = {"input_ids": prompt, "sampling_params": params}
        got = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()
        rows = decode(got["routed_experts"])
        np.testing.assert_array_equal(rows, reference("qwen3-moe", prompt + got["output_ids"][:-1]))
        with httpx.stream("POST", f"{server.url}/generate", json={**body, "stream": True}, timeout=60) as r:
            lines = [line.removeprefix("data: ") for line in r.iter_lines() if line]
        streamed = [decode(json.loads(line)["routed_experts"]) for line in lines[:-1]]
        np.testing.assert_array_equal(np.concatenate(streamed), rows)
        partial = {"token_ids": got["output_ids"][:3], "routed_experts": {**got["routed_experts"], "data": base64.b64encode(
            rows[: len(prompt) + 2].astype("<i2").tobytes()).decode(), "shape": [len(prompt) + 2, 2, 2]}}
        cont = httpx.post(f"{server.url}/generate", json={**body, "partial": partial}, timeout=60).json()
        assert cont["output_ids"][:3] == got["output_ids"][:3]
        np.testing.assert_array_equal(decode(cont["routed_experts"]),
                                      reference("qwen3-moe", prompt + cont["output_ids"][:-1]))
        assert httpx.get(f"{server.url}/openapi.json", timeout=60).status_code == 200
    finally:
        server.stop()
