"""The n samples of a prompt: once one of them has computed the prompt's full blocks, the others come in
together (as far as max_num_seqs, the token budget and free blocks allow), each sharing those blocks and
computing only the rest of its prompt; their seeded outputs are those of the transformers reference."""

import random

import pytest
import torch
from safetensors.torch import load_file

from rollout import RolloutEngine, SamplingParams
from rollout.block_manager import BlockManager
from rollout.core import EngineCore
from rollout.scheduler import ScheduledSeq, Scheduler
from rollout.sequence import Sequence
from checkpoints import load_reference
from test_seeded_sampling import LOGPROB_ATOL, Reference, assert_matches_reference

LONG = [(11 * j + 5) % 300 + 3 for j in range(40)]  # 2 full blocks of 16 shared by the samples, 8 tokens each


# --------------------------------------------------------------------------------------------
# The scheduler and block manager on their own, stepped as EngineCore steps them
# --------------------------------------------------------------------------------------------


def scheduler(num_blocks=400, block_size=16, caching=True, max_num_seqs=256, budget=8192) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size, caching), max_num_seqs, budget)


def add(sched: Scheduler, prompt: list[int], n: int, max_tokens: int, group: int = 0) -> list[Sequence]:
    params = SamplingParams(n=n, max_tokens=max_tokens)
    seqs = [Sequence(seq_id=group * 10_000 + j, request_id=str(group), index=j, prompt_len=len(prompt),
                     token_ids=list(prompt), params=params, seed=j, group=group, max_output=max_tokens)
            for j in range(n)]
    for seq in seqs:
        sched.add(seq)
    return seqs


def step(sched: Scheduler) -> list[ScheduledSeq]:
    """One step: the scheduled tokens are computed, each sampling sequence gets token 1 and ends at max_tokens."""
    plan = sched.schedule()
    scheduled = plan.items if plan else []
    for item in scheduled:
        sampled = item.samples
        item.seq.num_computed += item.num_new
        sched.blocks.commit(item.seq)
        if sampled:
            item.seq.token_ids.append(1)
            if item.seq.num_output == item.seq.params.max_tokens:
                sched.finish(item.seq)
    return scheduled


def steps_to_finish(sched: Scheduler) -> int:
    count = 0
    while sched.has_work():
        assert step(sched), "a step scheduled nothing"
        count += 1
    return count


def blocks_in_use(sched: Scheduler) -> int:
    return len(sched.blocks.blocks) - sched.blocks.num_free


def test_n_samples_of_a_short_prompt_take_one_step_per_batch():
    """3-token prompt (no full block to share): 2000 samples at 256 a step are 8 steps (one per sample before)."""
    sched = scheduler()
    add(sched, [5, 6, 7], n=2000, max_tokens=1)
    first = step(sched)
    assert len(first) == 256 and all(item.num_new == 3 for item in first)
    assert 1 + steps_to_finish(sched) == 8  # ceil(2000 / 256)


@pytest.mark.parametrize("caching", [True, False], ids=["prefix-caching", "no-prefix-caching"])
def test_n_samples_share_the_prompt_blocks_computed_once(caching):
    """40-token prompt: step 1 computes it for sample 0 (which ends there, max_tokens=1); the other 1999 then
    come in 256 a step, each on the two shared blocks plus one block of its own for its last 8 tokens."""
    sched = scheduler(caching=caching)
    add(sched, LONG, n=2000, max_tokens=1)
    assert [item.num_new for item in step(sched)] == [40]
    second = step(sched)
    assert [item.num_new for item in second] == [8] * 256
    prompt_blocks = second[0].seq.block_table[:2]
    assert all(item.seq.block_table[:2] == prompt_blocks for item in second)
    assert 2 + steps_to_finish(sched) == 1 + 8  # ceil(1999 / 256) steps after the first
    assert sched.blocks.num_hit_blocks == 1999 * 2
    if not caching:
        assert sched.blocks.cached == {}, "with prefix caching off the prompt stays findable only while samples wait"


def test_kept_prompt_blocks_are_forgotten_when_the_samples_are_dropped():
    """Prefix caching off: sample 0 ended in step 1 and its prompt blocks are kept for the 3 waiting samples;
    dropping the requests (a failed step) forgets them, so no later request finds them."""
    sched = scheduler(caching=False)
    add(sched, LONG, n=4, max_tokens=1)
    step(sched)
    assert len(sched.blocks.cached) == 2 and sched.blocks.num_free == 400
    sched.abort_all()
    add(sched, LONG, n=1, max_tokens=1, group=1)
    assert [item.num_new for item in step(sched)] == [40] and sched.blocks.num_hit_blocks == 0


def test_siblings_take_references_not_copies():
    """Step 2 of a 16-sample request: sample 0 decodes, the 15 others compute their 8 last prompt tokens; the
    prompt's 2 full blocks are held once (16 references) and each sample has one block of its own."""
    sched = scheduler()
    seqs = add(sched, LONG, n=16, max_tokens=5)
    step(sched)
    assert blocks_in_use(sched) == 3
    assert [item.num_new for item in step(sched)] == [1] + [8] * 15
    shared = seqs[0].block_table[:2]
    assert [sched.blocks.blocks[b].ref_count for b in shared] == [16, 16]
    assert blocks_in_use(sched) == 2 + 16
    assert len({seq.block_table[2] for seq in seqs}) == 16


def test_admission_stops_at_max_num_seqs_budget_and_free_blocks():
    sched = scheduler(max_num_seqs=6)
    add(sched, LONG, n=16, max_tokens=5)
    step(sched)
    assert [item.num_new for item in step(sched)] == [1] + [8] * 5
    sched = scheduler(budget=20)  # 20 + 20 prompt tokens; then 1 + 8 + 8 + the first 3 of a third sample's 8
    add(sched, LONG, n=16, max_tokens=5)
    assert [[item.num_new for item in step(sched)] for _ in range(3)] == [[20], [20], [1, 8, 8, 3]]
    assert [item.num_new for item in step(sched)] == [1, 1, 1, 5, 8, 4]  # a chunked sample holds back no one
    sched = scheduler(num_blocks=8)  # sample 0 holds 3 blocks: room for 5 more samples of one block each
    add(sched, LONG, n=16, max_tokens=5)
    step(sched)
    assert [item.num_new for item in step(sched)] == [1] + [8] * 5
    assert sched.blocks.num_free == 0 and sched.num_preemptions == 0


def test_samples_wait_while_the_prompt_blocks_are_prefilled_in_chunks():
    """Budget 16: the others wait while sample 0 computes the 2 full blocks, and join it as soon as they are
    computed (in the step where sample 0 computes its last 8 tokens)."""
    sched = scheduler(budget=16)
    add(sched, LONG, n=4, max_tokens=3)
    assert [[item.num_new for item in step(sched)] for _ in range(4)] == [[16], [16], [8, 8], [1, 1, 8, 6]]
    assert sched.blocks.num_hit_blocks == 3 * 2


def test_siblings_after_a_weight_update_compute_the_prompt_anew():
    """A cache reset (weights changed) between steps: the waiting samples must not use sample 0's blocks
    (old weights); the first computes the prompt again, and the rest then share its blocks."""
    sched = scheduler()
    seqs = add(sched, LONG, n=4, max_tokens=6)
    step(sched)
    sched.blocks.reset_prefix_cache()
    assert [item.num_new for item in step(sched)] == [1, 40]
    assert [item.num_new for item in step(sched)] == [1, 1, 8, 8]
    stale, fresh = seqs[0].block_table[:2], seqs[1].block_table[:2]
    assert not set(stale) & set(fresh)
    assert seqs[2].block_table[:2] == seqs[3].block_table[:2] == fresh


@pytest.mark.parametrize("caching", [True, False], ids=["prefix-caching", "no-prefix-caching"])
def test_preempted_samples_come_back_on_the_shared_blocks(caching):
    """Blocks run out while 4 samples decode (7 blocks: 2 shared, 4 of their own, 1 spare): samples are preempted
    and come back on the prompt blocks that sample 0 still holds."""
    sched = scheduler(num_blocks=7, caching=caching)
    seqs = add(sched, LONG, n=4, max_tokens=20)
    step(sched)
    shared = seqs[0].block_table[:2]
    while sched.has_work():
        assert step(sched), "a step scheduled nothing"
        assert all(seq.block_table[:2] == shared for seq in sched.running if seq is not seqs[0])
    assert sched.num_preemptions > 0
    assert all(seq.num_output == 20 for seq in seqs)
    assert sched.blocks.num_free == 7


# --------------------------------------------------------------------------------------------
# Through the engine: seeded samples equal the transformers reference under every schedule
# --------------------------------------------------------------------------------------------

PROMPT = [random.Random(5).randrange(3, 380) for _ in range(21)]  # 2 full blocks of 8 shared, 5 tokens each
PARAMS = SamplingParams(n=16, temperature=1.0, max_tokens=6, ignore_eos=True, logprobs=True, seed=321)


@pytest.fixture(scope="module")
def path(checkpoint_dir):
    return checkpoint_dir("qwen3", seed=3)


@pytest.fixture(scope="module")
def expected(path):
    ref = Reference(load_reference(path), eos_ids={2})
    return [ref.generate(PROMPT, PARAMS, index=j) for j in range(PARAMS.n)]


def engine(path, **config) -> RolloutEngine:
    fields = dict(device="cpu", block_size=8, num_kv_blocks=256, max_model_len=64) | config
    return RolloutEngine(model=str(path), **fields)


@pytest.mark.parametrize("config", [
    dict(),
    dict(enable_prefix_caching=False),
    dict(max_num_seqs=1),  # one sample at a time: the schedule of before
    dict(max_num_batched_tokens=16, max_num_seqs=5),
    dict(num_kv_blocks=12, enable_prefix_caching=False, num_decode_steps=1),  # preemption
], ids=["default", "no-prefix-caching", "one-at-a-time", "chunked", "preempting"])
def test_seeded_samples_match_the_reference(path, expected, config):
    eng = engine(path, **config)
    samples = eng.generate([PROMPT], PARAMS, use_tqdm=False)[0].samples
    for sample, want in zip(samples, expected):
        assert_matches_reference(sample, want, PARAMS)
    assert len({tuple(s.token_ids) for s in samples}) > 8
    if "num_kv_blocks" in config:
        assert eng.core.scheduler.num_preemptions > 0


def test_second_step_admits_all_samples_on_the_shared_blocks(path):
    eng = engine(path)
    widths = []
    launch = eng.worker.launch
    eng.worker.launch = lambda batch: widths.append([len(c.token_ids) for c in batch.chunks]) or launch(batch)
    eng.generate([PROMPT], PARAMS, use_tqdm=False)
    assert widths[:2] == [[21], [1] + [5] * 15]
    assert eng.core.block_manager.num_hit_blocks == 15 * 2


def test_samples_admitted_after_a_weight_update_use_the_new_weights(path, checkpoint_dir, expected):
    """An update lands after step 1 (sample 0 has computed the prompt on the old weights); the other samples
    sample every token with the new weights, so they match the reference of the new checkpoint."""
    new = checkpoint_dir("qwen3", seed=4)
    eng = engine(path, num_decode_steps=1)
    core = EngineCore(eng.config, eng.worker, {2})  # a core of our own on the idle engine's worker
    seqs = core.add_request("0", PROMPT, PARAMS, PARAMS.seed)
    assert core.step(None)[0] is None and seqs[0].num_output == 1
    eng.worker.load_weights(list(load_file(str(new / "model.safetensors")).items()))
    core.serving.serve(1)
    while core.has_work():
        core.step(None)
    ref = Reference(load_reference(new), eos_ids={2})
    for j in (1, 7, 15):
        want = ref.generate(PROMPT, PARAMS, index=j)
        assert seqs[j].output_ids == want.token_ids
        got = torch.tensor(seqs[j].logprobs, dtype=torch.float64)
        torch.testing.assert_close(got, torch.stack([d[t] for d, t in zip(want.processed, want.token_ids)]),
                                   atol=LOGPROB_ATOL, rtol=0)
    assert seqs[0].output_ids[0] == expected[0].token_ids[0] and seqs[0].weight_versions[:2] == [0, 1]
