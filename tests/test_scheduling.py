"""Preemption, prefix caching, chunked prefill and decode rounds change how work is scheduled, never the outputs."""

import random

import pytest

from rollout import RolloutEngine, SamplingParams

PROMPTS = [list(range(10, 10 + n)) for n in (5, 40, 17, 64, 3, 33)]
SHARED = list(range(100, 148))  # 48 tokens = 6 full blocks of 8
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=True)
SAMPLED = SamplingParams(n=3, temperature=0.9, top_p=0.95, max_tokens=24, ignore_eos=True, logprobs=True, seed=11)


def run(path, prompts, params, **config):
    fields = dict(device="cpu", block_size=8, num_kv_blocks=256, max_model_len=128) | config
    engine = RolloutEngine(model=str(path), **fields)
    return engine, engine.generate(prompts, params, use_tqdm=False)


def tokens(outs):
    return [[s.token_ids for s in o.samples] for o in outs]


def assert_same(outs, baseline):
    assert tokens(outs) == tokens(baseline)
    for out, ref in zip(outs, baseline):
        for s, r in zip(out.samples, ref.samples):
            assert s.logprobs == pytest.approx(r.logprobs, abs=1e-4)


@pytest.fixture(scope="module")
def path(checkpoint_dir):
    return checkpoint_dir("qwen3", seed=3)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_preemption_keeps_outputs(path, params):
    _, baseline = run(path, PROMPTS, params, enable_prefix_caching=False)
    engine, outs = run(path, PROMPTS, params, num_kv_blocks=16, enable_prefix_caching=False)
    assert engine.core.scheduler.num_preemptions > 0
    assert_same(outs, baseline)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_chunked_prefill_keeps_outputs(path, params):
    _, baseline = run(path, PROMPTS, params)
    engine, outs = run(path, PROMPTS, params, max_num_batched_tokens=16, max_num_seqs=4)
    assert_same(outs, baseline)


def test_chunked_prefill_splits_long_prompts(path):
    engine = RolloutEngine(model=str(path), device="cpu", block_size=8, num_kv_blocks=64, max_model_len=128,
                           max_num_batched_tokens=16)
    steps = []
    launch, resume = engine.worker.launch, engine.worker.resume
    engine.worker.launch = lambda batch: (
        steps.extend([[len(c.token_ids) for c in batch.chunks]] * batch.num_steps) or launch(batch))
    engine.worker.resume = lambda previous, num_steps, tables: (
        steps.extend([[1] * len(tables)] * num_steps) or resume(previous, num_steps, tables))
    engine.generate([PROMPTS[3]], GREEDY, use_tqdm=False)
    assert steps[:4] == [[16], [16], [16], [16]]  # 64-token prompt in four chunks, then one token a step
    # (decode steps counted one by one, also when they run as rounds of num_decode_steps, queued or not)
    assert all(s == [1] for s in steps[4:]) and len(steps) == 4 + GREEDY.max_tokens - 1


def test_prefix_cache_hits_keep_outputs(path):
    prompts = [SHARED + [7, 8, 9], SHARED + [300, 301], SHARED[:20]]
    _, baseline = run(path, prompts, GREEDY, enable_prefix_caching=False)
    engine = RolloutEngine(model=str(path), device="cpu", block_size=8, num_kv_blocks=256, max_model_len=128)
    first = engine.generate(prompts[:1], GREEDY, use_tqdm=False)
    hits_before = engine.core.block_manager.num_hit_blocks
    rest = engine.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert engine.core.block_manager.num_hit_blocks - hits_before >= 6 + 2
    assert_same(first + rest, baseline)


def test_samples_of_a_prompt_share_prompt_blocks(path):
    """n samples prefill the prompt once; the others reuse its full blocks (also with prefix caching off)."""
    params = SamplingParams(n=4, temperature=1.0, max_tokens=4, seed=5)
    engine, outs = run(path, [SHARED], params, enable_prefix_caching=False)
    assert engine.core.block_manager.num_hit_blocks == 3 * 5  # 47 tokens reusable: 5 full blocks each
    _, alone = run(path, [SHARED], params, num_kv_blocks=256)
    assert tokens(outs) == tokens(alone)
    assert len({tuple(s.token_ids) for s in outs[0].samples}) > 1


def test_max_num_seqs_bounds_the_batch(path):
    engine = RolloutEngine(model=str(path), device="cpu", block_size=8, num_kv_blocks=256, max_model_len=128,
                           max_num_seqs=2)
    widths = []
    launch = engine.worker.launch
    engine.worker.launch = lambda batch: widths.append(len(batch.chunks)) or launch(batch)
    outs = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert max(widths) == 2 and all(len(o.samples[0].token_ids) == 24 for o in outs)


def test_decode_rounds_keep_outputs(path):
    """Several decode steps per round give the step-by-step results: stops mid-round (a stop token, max_tokens
    not a multiple of the round, max_model_len), seeded and greedy rows, and a second call on cached prefixes."""
    free = [SamplingParams(temperature=0.8, max_tokens=23, ignore_eos=True, logprobs=True, seed=4)]
    _, probe = run(path, PROMPTS[:1], free, num_decode_steps=1)
    stop_token = probe[0].samples[0].token_ids[6]
    params = [
        SamplingParams(n=2, temperature=0.8, max_tokens=23, stop_token_ids=[stop_token], logprobs=True, seed=4),
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=True, logprobs_mode="raw"),
        SamplingParams(temperature=1.0, max_tokens=80, ignore_eos=True, logprobs=True, seed=9),
    ]
    params = [params[i] for i in (0, 1, 0, 2, 1, 0)]  # PROMPTS[3] (64 tokens) runs into max_model_len
    _, baseline = run(path, PROMPTS, params, num_decode_steps=1)
    engine = RolloutEngine(model=str(path), device="cpu", block_size=8, num_kv_blocks=256, max_model_len=128,
                           num_decode_steps=4)
    rounds, queued = [], []
    launch, resume = engine.worker.launch, engine.worker.resume
    engine.worker.launch = lambda batch: rounds.append(batch.num_steps) or launch(batch)
    engine.worker.resume = lambda previous, num_steps, tables: queued.append(num_steps) or resume(previous,
                                                                                               num_steps, tables)
    for _ in range(2):
        outs = engine.generate(PROMPTS, params, use_tqdm=False)
        assert_same(outs, baseline)
        assert [[s.finish_reason for s in o.samples] for o in outs] == \
            [[s.finish_reason for s in o.samples] for o in baseline]
    assert baseline[0].samples[0].finish_reason == "stop" and len(baseline[0].samples[0].token_ids) == 7
    assert baseline[3].samples[0].finish_reason == "length" and len(baseline[3].samples[0].token_ids) == 128 - 64
    assert max(rounds) == 4 and max(queued) == 4 and engine.core.block_manager.num_hit_blocks > 0


@pytest.mark.parametrize("case", range(6))
def test_random_batches_same_with_and_without_decode_rounds(path, case):
    """Random prompts, params and cache shapes: rounds of 3 and 8 steps (queued ahead or not) give the tokens,
    logprobs and finish / stop reasons of single steps, also on a second call over cached prefixes."""
    rng = random.Random(case)
    max_len, block = rng.choice([40, 64, 128]), rng.choice([4, 8, 16])
    prompts = [[rng.randrange(5, 300) for _ in range(rng.randrange(1, max_len - 2))]
               for _ in range(rng.randrange(2, 6))]
    params = []
    for _ in prompts:
        max_tokens = rng.randrange(1, 60)
        params.append(SamplingParams(
            n=rng.choice([1, 2, 3]), temperature=rng.choice([0.0, 0.8, 1.5]), max_tokens=max_tokens,
            min_tokens=rng.randrange(0, max_tokens + 1) if rng.random() < 0.3 else 0,
            stop_token_ids=rng.sample(range(5, 300), rng.choice([0, 3, 20])), ignore_eos=rng.random() < 0.5,
            logprobs=True, seed=rng.randrange(100)))
    config = dict(block_size=block, max_model_len=max_len, enable_prefix_caching=rng.random() < 0.5,
                  num_kv_blocks=rng.choice([-(-max_len // block), -(-max_len // block) + 3, 256]),
                  max_num_seqs=rng.choice([1, 2, 4, 256]), max_num_batched_tokens=rng.choice([16, 64, 8192]))

    def reasons(outs):
        return [[(s.finish_reason, s.stop_reason) for s in o.samples] for o in outs]

    _, baseline = run(path, prompts, params, num_decode_steps=1, **config)
    for steps in (3, 8):
        engine, outs = run(path, prompts, params, num_decode_steps=steps, **config)
        again = engine.generate(prompts, params, use_tqdm=False)
        for got in (outs, again):
            assert_same(got, baseline)
            assert reasons(got) == reasons(baseline)
