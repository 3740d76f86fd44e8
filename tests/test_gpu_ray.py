"""executor="ray" on GPUs (`multigpu`): tensor parallelism over NCCL against one GPU, in bf16."""

import pytest
import torch

ray = pytest.importorskip("ray")

from rollout import RolloutEngine, SamplingParams  # noqa: E402

pytestmark = [pytest.mark.multigpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]
PROMPTS = [[4, 8, 15, 16, 23, 42], [99] * 9, [7], [3, 1, 4, 1, 5, 9, 2, 6]]


def test_tensor_parallel_two_gpus_match_one_within_bf16(checkpoint_dir):
    path = str(checkpoint_dir("qwen3"))
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=True, logprobs_mode="raw")
    single = RolloutEngine(model=path, dtype="bfloat16", num_kv_blocks=64).generate(PROMPTS, params, use_tqdm=False)
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        engine = RolloutEngine(model=path, executor="ray", tensor_parallel_size=2, dtype="bfloat16", num_kv_blocks=64)
        split = engine.generate(PROMPTS, params)
        engine.shutdown()
    finally:
        ray.shutdown()
    diffs, same = [], 0
    for a, b in zip(single, split):
        x, y = a.samples[0], b.samples[0]
        common = next((i for i, (s, t) in enumerate(zip(x.token_ids, y.token_ids)) if s != t), len(x.token_ids))
        same += common >= 16
        diffs += [abs(p - q) for p, q in zip(x.logprobs[:common], y.logprobs[:common])]
    assert same >= 3, "greedy tokens diverged early on more than one prompt"
    assert sum(diffs) / len(diffs) <= 2e-2
