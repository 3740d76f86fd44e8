"""The CUDA fast path (Triton kernels, CUDA-graph decode, fused sampler) against independent references.

Run with `pytest -m gpu` on the device machine. The transformers comparisons are in test_gpu.py
(they run the fast path too: it is what 'auto' picks on CUDA).
"""

import pytest
import torch

from rollout import RolloutEngine, SamplingParams
from test_parity import PROMPTS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MIXED = [
    SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=True),
    SamplingParams(n=2, temperature=0.9, max_tokens=30, ignore_eos=True, logprobs=True, seed=5),
    SamplingParams(temperature=1.0, top_p=0.8, top_k=40, max_tokens=30, ignore_eos=True, logprobs=True, seed=6),
    SamplingParams(temperature=0.7, min_p=0.05, min_tokens=10, top_logprobs=3, max_tokens=30, logprobs=True,
                   logprobs_mode="raw", seed=7),
]


def engine(path, **kw):
    return RolloutEngine(model=str(path), device="cuda", num_kv_blocks=256, block_size=16, **kw)


def run(eng, prompts=PROMPTS, params=MIXED):
    params = [params[i % len(params)] for i in range(len(prompts))]
    outs = eng.generate(prompts, params, use_tqdm=False)
    return [[(s.token_ids, s.logprobs, s.top_logprobs) for s in o.samples] for o in outs]


def assert_same(got, expected, atol):
    for g, e in zip(got, expected):
        for (gt, gl, gtop), (et, el, etop) in zip(g, e):
            assert gt == et
            assert max(abs(a - b) for a, b in zip(gl, el)) <= atol
            assert (gtop is None) == (etop is None)
            for g_top, e_top in zip(gtop or [], etop or []):
                assert list(g_top) == list(e_top)
                assert list(g_top.values()) == pytest.approx(list(e_top.values()), abs=atol)


def test_fast_path_is_what_auto_picks(checkpoint_dir):
    eng = engine(checkpoint_dir("qwen3"), dtype="bfloat16")
    assert eng.worker.runner.backend.name == "triton" and eng.worker.runner.graphs is not None


@pytest.mark.parametrize("variant", ["qwen3", "llama3", "qwen2"])
def test_fp32_fast_path_matches_reference_backend(checkpoint_dir, variant):
    """Greedy, seeded, filtered, banned and top-logprob rows: same tokens as the pure-torch engine."""
    path = checkpoint_dir(variant)
    expected = run(engine(path, dtype="float32", attention_backend="reference", enforce_eager=True))
    assert_same(run(engine(path, dtype="float32")), expected, atol=2e-3)


def test_graph_replay_equals_eager_triton(checkpoint_dir):
    path = checkpoint_dir("qwen3")
    eager = run(engine(path, dtype="float32", enforce_eager=True))
    assert_same(run(engine(path, dtype="float32")), eager, atol=1e-4)


def test_graphs_stay_valid_across_sleep_and_weight_loads(checkpoint_dir):
    """Sleep level 1 + wake keeps the addresses the graphs replay; a weight load is seen by the next replay."""
    eng = engine(checkpoint_dir("qwen3"), dtype="bfloat16", enable_sleep_mode=True)
    before = run(eng)
    eng.sleep(level=1)
    eng.wake_up()
    assert run(eng) == before
    other = checkpoint_dir("qwen3", seed=1)
    from safetensors.torch import load_file

    weights = {k: v for f in sorted(other.glob("*.safetensors")) for k, v in load_file(f).items()}
    eng.load_weights(weights.items())
    fresh = run(engine(other, dtype="bfloat16"))
    assert run(eng) == fresh


def test_batches_past_the_largest_graph_run_eagerly(checkpoint_dir):
    path = checkpoint_dir("qwen3")
    prompts = [[(7 * i + j) % 100 + 1 for j in range(5 + i % 7)] for i in range(40)]
    params = [SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True, logprobs=True, seed=1)]
    small = engine(path, dtype="float32", cuda_graph_max_batch_size=16)
    assert max(size for size, _ in small.worker.runner.graphs.graphs) == 16
    assert_same(run(small, prompts, params), run(engine(path, dtype="float32", enforce_eager=True), prompts, params),
                atol=1e-4)


def test_async_streams_on_the_fast_path_equal_one_generate_and_abort_mid_round(checkpoint_dir):
    """64 concurrent streams (CUDA graphs, decode rounds) equal one synchronous generate; an abort while decode
    rounds are queued ends that stream only, and returns every KV block."""
    import asyncio

    from rollout import AsyncRolloutEngine

    eng = AsyncRolloutEngine(model=str(checkpoint_dir("qwen3")), device="cuda", dtype="float32", num_kv_blocks=512,
                             block_size=16)
    prompts = [[(7 * i + j) % 300 + 3 for j in range(5 + i % 23)] for i in range(64)]
    params = [SamplingParams(temperature=(i % 3) * 0.5, max_tokens=40, ignore_eos=True, logprobs=True, seed=i)
              for i in range(64)]
    want = eng.engine.generate(prompts, params, use_tqdm=False)

    async def stream(prompt, p, rid):
        tokens, logprobs, finish = [], [], None
        async for delta in eng.generate_stream(prompt, p, request_id=rid):
            tokens += delta.token_ids
            logprobs += delta.logprobs
            finish = delta.finish_reason
            if rid == "cut" and len(tokens) >= 9 and finish is None:
                await eng.abort("cut")
        return tokens, logprobs, finish

    async def main():
        cut = asyncio.ensure_future(stream(prompts[0], params[0].model_copy(update={"max_tokens": 400}), "cut"))
        got = await asyncio.gather(*(stream(p, s, str(i)) for i, (p, s) in enumerate(zip(prompts, params))))
        return got, await cut

    try:
        got, cut = asyncio.run(main())
        for (tokens, logprobs, finish), out in zip(got, want):
            assert tokens == out.samples[0].token_ids and finish == "length"
            assert max(abs(a - b) for a, b in zip(logprobs, out.samples[0].logprobs)) <= 2e-3
        n = min(len(cut[0]), 40)  # greedy: the first 40 are those of the 40-token sample
        assert cut[2] == "abort" and 9 <= len(cut[0]) < 400 and cut[0][:n] == want[0].samples[0].token_ids[:n]
        manager = eng.engine.core.block_manager
        assert manager.num_free == len(manager.blocks)
    finally:
        asyncio.run(eng.shutdown())
