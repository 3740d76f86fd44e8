"""Sleep / wake on CUDA virtual memory: run with `pytest -m gpu` on a GPU machine."""

import pytest
import torch

from rollout import RolloutEngine, SamplingParams, WeightsInvalidError

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = [list(range(20, 60)), [3, 1, 4, 1, 5]]
PARAMS = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=True),
          SamplingParams(n=2, temperature=1.0, top_p=0.9, max_tokens=12, ignore_eos=True, logprobs=True, seed=2)]


def run(engine):
    return [[(s.token_ids, s.logprobs) for s in o.samples] for o in engine.generate(PROMPTS, PARAMS, use_tqdm=False)]


def capture_head(engine):
    """A CUDA graph over arena views: final norm, one MLP and the LM head of the live model."""
    model = engine.worker.model
    static_in = torch.randn(8, model.config.hidden_size, device="cuda", dtype=engine.worker.dtype)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(2):
            model.compute_logits(model.model.layers[0].mlp(model.model.norm(static_in)))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        static_out = model.compute_logits(model.model.layers[0].mlp(model.model.norm(static_in)))
    graph.replay()
    torch.cuda.synchronize()
    return graph, static_out, static_out.clone()


def test_hundred_cycles_keep_outputs_graphs_addresses_and_memory(checkpoint_dir):
    engine = RolloutEngine(model=str(checkpoint_dir("qwen3")), device="cuda", dtype="bfloat16",
                           enable_sleep_mode=True, kv_cache_memory_bytes=4 << 30)
    before = run(engine)
    graph, static_out, expected = capture_head(engine)
    pointers = {n: p.data_ptr() for n, p in engine.worker.model.named_parameters()}
    kv_pointer = engine.worker.runner.kv_caches[0].data_ptr()
    engine.sleep(level=1)
    engine.wake_up()
    torch.cuda.synchronize()
    first_free = torch.cuda.mem_get_info()[0]
    for _ in range(100):
        engine.sleep(level=1)
        engine.wake_up()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, expected)
    assert run(engine) == before
    assert {n: p.data_ptr() for n, p in engine.worker.model.named_parameters()} == pointers
    assert engine.worker.runner.kv_caches[0].data_ptr() == kv_pointer
    torch.cuda.synchronize()
    assert abs(torch.cuda.mem_get_info()[0] - first_free) <= 64 << 20


def test_sleep_frees_the_arenas(checkpoint_dir):
    engine = RolloutEngine(model=str(checkpoint_dir("qwen3")), device="cuda", dtype="bfloat16",
                           enable_sleep_mode=True, kv_cache_memory_bytes=4 << 30)
    report = engine.memory_report()
    arenas = sum(a.mapped_bytes for a in report.arenas.values())
    free_awake = torch.cuda.mem_get_info()[0]
    for level in (1, 2):
        engine.sleep(level=level)
        freed = torch.cuda.mem_get_info()[0] - free_awake
        assert freed >= 0.95 * arenas
        assert all(a.mapped_bytes == 0 for a in engine.memory_report().arenas.values())
        engine.wake_up()
    with pytest.raises(WeightsInvalidError):
        run(engine)


def test_two_engines_on_one_gpu_sleep_independently(checkpoint_dir):
    a = RolloutEngine(model=str(checkpoint_dir("qwen3")), device="cuda", enable_sleep_mode=True,
                      kv_cache_memory_bytes=1 << 30)
    b = RolloutEngine(model=str(checkpoint_dir("qwen3")), device="cuda", enable_sleep_mode=True,
                      kv_cache_memory_bytes=2 << 30)
    expected = run(b)
    a.sleep(level=1)
    assert run(b) == expected
    b.sleep(level=1)
    a.wake_up()
    b.wake_up()
    assert run(a) == run(b) == expected


def test_shutdown_returns_the_memory(checkpoint_dir):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # capturing CUDA graphs empties the cache; do it first so it does not count
    free_before = torch.cuda.mem_get_info()[0]
    engine = RolloutEngine(model=str(checkpoint_dir("qwen3")), device="cuda", enable_sleep_mode=True,
                           kv_cache_memory_bytes=4 << 30)
    run(engine)
    assert torch.cuda.mem_get_info()[0] < free_before - (4 << 30)
    engine.shutdown()
    torch.cuda.synchronize()
    assert torch.cuda.mem_get_info()[0] >= free_before - (64 << 20)
