"""Prompt scoring (`prompt_logprobs`, `max_tokens=0`) against transformers' forward log-softmax (fp32, 1e-4):
chunked prefill, prefix-cache hits, n > 1, decode afterwards, the async engine, and bad values."""

import asyncio

import pytest
import torch
from pydantic import ValidationError

from checkpoints import load_reference
from rollout import AsyncRolloutEngine, InvalidRequestError, RolloutEngine, SamplingParams
from worker import scoring

PREFIX = list(range(100, 140))  # 5 full blocks of 8
PROMPTS = [PREFIX + [7, 3, 250, 31, 9], list(range(10, 60)), [5, 17], [300]]


def reference_scores(model, prompt, k):
    with torch.no_grad():
        scores = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    logprobs = [scores[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    return logprobs, scores[: len(prompt) - 1].topk(k, dim=-1) if k else None


def check(out, model, k):
    logprobs, top = reference_scores(model, out.prompt_token_ids, k)
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids) - 1
    assert out.prompt_logprobs == pytest.approx(logprobs, abs=1e-4)
    if k:
        assert len(out.prompt_top_logprobs) == len(logprobs)
        for got, values, ids in zip(out.prompt_top_logprobs, top.values.tolist(), top.indices.tolist()):
            assert list(got) == ids and list(got.values()) == pytest.approx(values, abs=1e-4)
    else:
        assert out.prompt_top_logprobs is None


@pytest.mark.parametrize("variant", ["qwen3", "llama3", "qwen2"])
def test_prompt_logprobs_equal_transformers_chunked_and_after_a_prefix_hit(checkpoint_dir, variant):
    """Chunks of 16 tokens; the second call's prompts hit the cache (the first call computed them) and are scored
    whole all the same; max_tokens=0 generates nothing, a decoding request also scores."""
    path = checkpoint_dir(variant)
    engine = RolloutEngine(model=str(path), device="cpu", block_size=8, num_kv_blocks=128,
                           max_num_batched_tokens=16, enable_prefix_caching=True)
    model = load_reference(path)
    plain = SamplingParams(max_tokens=4, ignore_eos=True)
    engine.generate(PROMPTS[:2], plain, use_tqdm=False)  # fills the prefix cache
    hits = engine.core.block_manager.num_hit_blocks
    params = [SamplingParams(max_tokens=0, prompt_logprobs=3), SamplingParams(max_tokens=5, prompt_logprobs=0,
                                                                              ignore_eos=True, seed=1)]
    outs = engine.generate(PROMPTS, [params[i % 2] for i in range(len(PROMPTS))], use_tqdm=False)
    for i, out in enumerate(outs):
        check(out, model, 3 if i % 2 == 0 else 0)
        assert len(out.samples[0].token_ids) == (0 if i % 2 == 0 else 5)
    assert outs[0].samples[0].finish_reason == "length"
    assert engine.core.block_manager.num_hit_blocks == hits  # scored prompts matched nothing
    again = engine.generate([PREFIX + [8, 8]], plain, use_tqdm=False)  # plain requests still hit
    assert engine.core.block_manager.num_hit_blocks > hits and len(again[0].samples[0].token_ids) == 4


def test_n_samples_score_once_and_generate_as_without(checkpoint_dir):
    path = checkpoint_dir("qwen3")
    engine = RolloutEngine(model=str(path), device="cpu", block_size=8, num_kv_blocks=128)
    params = SamplingParams(n=3, max_tokens=6, ignore_eos=True, seed=2, prompt_logprobs=2)
    out = engine.generate(PROMPTS[:1], params, use_tqdm=False)[0]
    check(out, load_reference(path), 2)
    want = engine.generate(PROMPTS[:1], params.model_copy(update={"prompt_logprobs": None}), use_tqdm=False)[0]
    assert [s.token_ids for s in out.samples] == [s.token_ids for s in want.samples]
    assert want.prompt_logprobs is None


def test_async_engine_returns_prompt_logprobs(checkpoint_dir):
    path = checkpoint_dir("qwen3")
    engine = AsyncRolloutEngine(model=str(path), device="cpu", block_size=8, num_kv_blocks=64)
    try:
        out = asyncio.run(engine.generate(PROMPTS[1], SamplingParams(max_tokens=0, prompt_logprobs=1)))
        check(out, load_reference(path), 1)
    finally:
        asyncio.run(engine.shutdown())


def test_scores_in_blocks_of_rows_equal_one_block(monkeypatch):
    """Blocks of 3 rows (ROW_ELEMENTS patched) give the whole log-softmax's values; ties list smaller ids first."""
    torch.manual_seed(0)
    weight = torch.randn(50, 8)
    hidden = torch.randn(11, 8)
    targets = torch.randint(0, 50, (11,))
    monkeypatch.setattr(scoring, "ROW_ELEMENTS", 150)
    calls = []
    logprobs, ids, values = scoring.score_rows(lambda h: calls.append(len(h)) or h @ weight.T, hidden, targets, 4)
    full = torch.log_softmax((hidden @ weight.T).double(), dim=-1)
    assert max(calls) == 3
    torch.testing.assert_close(logprobs.double(), full.gather(1, targets[:, None])[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(values.double(), full.topk(4).values, atol=1e-5, rtol=0)
    assert torch.equal(ids, full.topk(4).indices)
    tied = scoring.score_rows(lambda h: torch.zeros(len(h), 50), hidden[:2], targets[:2], 3)[1]
    assert tied.tolist() == [[0, 1, 2]] * 2


def test_bad_prompt_logprobs_raise_clear_errors(checkpoint_dir):
    with pytest.raises(ValidationError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
    with pytest.raises(ValidationError, match="max_tokens=0 needs prompt_logprobs"):
        SamplingParams(max_tokens=0)
    engine = RolloutEngine(model=str(checkpoint_dir("qwen3")), device="cpu", num_kv_blocks=32)
    with pytest.raises(InvalidRequestError, match="prompt_logprobs=385 exceeds the vocabulary size 384"):
        engine.generate([[1, 2]], SamplingParams(prompt_logprobs=385), use_tqdm=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_token_logprobs_equal_float64_log_softmax(dtype):
    """The scoring kernel (Triton's interpreter on CPU, natively on CUDA), over a vocabulary of three chunks with
    -inf entries: log_softmax of the logits (as float32) at the targets, against float64."""
    pytest.importorskip("triton")
    from worker.kernels.sampling import token_logprobs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(5, 20000, generator=gen) * 4).to(dtype)
    logits[1, ::7] = float("-inf")
    targets = torch.randint(0, 20000, (5,), generator=gen)
    targets[1] = 1  # not a -inf entry (1 % 7 != 0)
    want = torch.log_softmax(logits.double(), dim=-1).gather(1, targets[:, None])[:, 0]
    got = token_logprobs(logits.to(device), targets.to(device)).cpu()
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)


@pytest.mark.gpu
def test_gpu_scoring_kernel_path_equals_the_log_softmax_path():
    """score_rows on CUDA without top logprobs (the kernel) equals the float32 log-softmax path (with top)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(151936, 256, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.05
    hidden = torch.randn(700, 256, device="cuda", generator=gen, dtype=torch.bfloat16)
    targets = torch.randint(0, 151936, (700,), device="cuda", generator=gen)
    fused = scoring.score_rows(lambda h: h @ weight.T, hidden, targets, 0)[0]
    reference = scoring.score_rows(lambda h: h @ weight.T, hidden, targets, 1)[0]
    torch.testing.assert_close(fused, reference, atol=2e-5, rtol=0)
