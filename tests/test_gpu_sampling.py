"""Decode graphs with every sampling setting (filters, min_tokens bans, top logprobs, penalties) against eager
single steps on the same device. Run with `pytest -m gpu` on the device machine."""

import pytest
import torch

from rollout import RolloutEngine, SamplingParams
from test_gpu_fast import assert_same
from test_sampling_rounds import COMMON, PROMPTS, SETTINGS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def generate(path, params, prompts, **config):
    engine = RolloutEngine(model=str(path), device="cuda", dtype="float32", num_kv_blocks=256, block_size=16,
                           **config)
    outs = engine.generate(prompts, params, use_tqdm=False)
    return engine, [[(s.token_ids, s.logprobs, s.top_logprobs) for s in o.samples] for o in outs]


@pytest.mark.parametrize("setting", range(len(SETTINGS) + 1), ids=lambda i: f"setting{i}")
def test_graph_rounds_equal_eager_steps_for_every_setting(checkpoint_dir, setting):
    """One setting per batch (the last case mixes them all): rounds of 8 replayed from graphs of that mode give
    the tokens, logprobs and top logprobs of eager single steps."""
    path = checkpoint_dir("qwen3")
    chosen = SETTINGS if setting == len(SETTINGS) else [SETTINGS[setting]]
    params = [SamplingParams(**COMMON, **chosen[i % len(chosen)]) for i in range(12)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(12)]
    _, expected = generate(path, params, prompts, enforce_eager=True, num_decode_steps=1)
    engine, got = generate(path, params, prompts)
    assert_same(got, expected, atol=1e-4)
    assert any(mode is not None for _, mode in engine.worker.runner.graphs.graphs)
