"""EngineCore on its own: aborting one request at each stage of its life leaves the others' outputs as they are
without it, and every KV block and sequence comes back."""

import pytest
import torch

from rollout import EngineConfig, RolloutEngine, SamplingParams
from rollout.core import EngineCore

PROMPTS = {
    "a": [(7 * j + 3) % 290 + 5 for j in range(40)],  # 2.5 blocks: chunked at 16 tokens a step
    "b": [11, 12, 13, 14, 15],
    "c": [(5 * j + 1) % 280 + 9 for j in range(23)],
}
PARAMS = {
    "a": SamplingParams(temperature=1.0, seed=1, max_tokens=24, logprobs=True, ignore_eos=True),
    "b": SamplingParams(temperature=0, max_tokens=24, logprobs=True, ignore_eos=True),
    "c": SamplingParams(n=2, temperature=0.8, seed=5, max_tokens=24, logprobs=True, ignore_eos=True),
}


@pytest.fixture(scope="module")
def worker(checkpoint_dir):
    """The worker of an idle engine; each test builds its own cores over it."""
    engine = RolloutEngine(model=str(checkpoint_dir("qwen3", 0)), device="cpu", dtype="float32")
    return engine.worker, engine.config


def make_core(worker, **fields) -> EngineCore:
    w, config = worker
    return EngineCore(EngineConfig(**{**config.model_dump(), **fields}), w, {2})


def run(core: EngineCore, names, hook=None) -> dict:
    """Add the named requests, then step until nothing is left; `hook(core, queued, seqs)` runs before every turn."""
    seqs = {name: core.add_request(name, PROMPTS[name], PARAMS[name], PARAMS[name].seed or 0) for name in names}
    queued = None
    while core.has_work() or queued is not None:
        if hook is not None:
            hook(core, queued, seqs)
        queued, _ = core.step(queued)
    return seqs


def assert_same_samples(got, want):
    for g, w in zip(got, want):
        assert g.output_ids == w.output_ids and g.finish_reason == w.finish_reason
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5, rtol=0)


def assert_all_returned(core: EngineCore):
    manager = core.block_manager
    assert manager.num_free == len(manager.blocks) and all(b.ref_count == 0 for b in manager.blocks)
    assert not core.scheduler.running and not core.scheduler.waiting and not core.scheduler.num_waiting


def once(condition):
    """A hook that aborts request "a" the first time `condition(core, queued, seqs)` holds."""
    state = dict(done=False, output_at_abort=None)

    def hook(core, queued, seqs):
        if not state["done"] and condition(core, queued, seqs):
            state["done"] = True
            state["output_at_abort"] = seqs["a"][0].num_output
            ended = core.abort_request(seqs["a"])
            assert [p.seq for p in ended] == seqs["a"]

    hook.state = state
    return hook


STAGES = {
    "before-start": (dict(), lambda core, queued, seqs: True),
    "mid-prefill": (dict(max_num_batched_tokens=16), lambda core, q, seqs: 0 < seqs["a"][0].num_computed < 40),
    "mid-decode": (dict(num_decode_steps=1), lambda core, q, seqs: seqs["a"][0].num_output == 3),
    "queued-round": (dict(num_decode_steps=4),
                     lambda core, q, seqs: q is not None and seqs["a"][0] in [i.seq for i in q.plan.items]),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_abort_leaves_the_others_unchanged_and_returns_every_block(worker, stage):
    fields, condition = STAGES[stage]
    want = run(make_core(worker, **fields), ["b", "c"])
    core = make_core(worker, **fields)
    hook = once(condition)
    got = run(core, ["a", "b", "c"], hook)
    assert hook.state["done"]
    for name in ("b", "c"):
        assert_same_samples(got[name], want[name])
    aborted = got["a"][0]
    assert aborted.finish_reason == "abort" and aborted.num_output == hook.state["output_at_abort"]
    alone = run(make_core(worker, **fields), ["a"])["a"][0]
    assert aborted.output_ids == alone.output_ids[:aborted.num_output]  # what it had is what it would have had
    assert_all_returned(core)


def test_abort_after_finish_is_a_no_op(worker):
    core = make_core(worker)
    seqs = run(core, ["b"])
    before = list(seqs["b"][0].output_ids)
    assert core.abort_request(seqs["b"]) == []
    assert seqs["b"][0].output_ids == before and seqs["b"][0].finish_reason == "length"
    assert_all_returned(core)
