"""The fused filtered sampler (Triton's interpreter on CPU, natively on CUDA) against `torch_sample`, and
penalties against a hand-written float64 reference.

Expectations: the fused sampler picks torch_sample's tokens for the same seeds, with its processed and raw
logprobs (float32 rounding apart) and its top logprobs (ids where the value is finite); ties rank by token
id in both. Logits are random normals (continuous, so no filter boundary sits within rounding of a
token) or rounded to halves (many exact ties, where the mass of a tied group never lands on top_p).
"""

import itertools
import math
import random

import pytest
import torch

pytest.importorskip("triton")  # conftest selected the interpreter when there is no CUDA

from worker.penalties import PenaltyTensors, record_tokens  # noqa: E402
from worker.sampler import fused_filtered_sample, sample, torch_sample  # noqa: E402

from sampling_reference import _check_empirical, make_tensors, penalty_tensors, random_logits  # noqa: E402
from worker.kernels import filtered_sampling  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NEG_INF = float("-inf")


def on_device(t):
    """A copy of a SamplingTensors (or PenaltyTensors) with every tensor, nested ones too, on DEVICE."""
    def move(v):
        if torch.is_tensor(v):
            return v.to(DEVICE)
        return on_device(v) if isinstance(v, PenaltyTensors) else v
    return type(t)(**{name: move(v) for name, v in vars(t).items()})


def assert_agree(fused, expected, atol=1e-5):
    """Same tokens; logprobs within atol; top logprobs: same -inf pattern, values and (finite) ids."""
    assert torch.equal(fused.token_ids, expected.token_ids), (
        f"rows {(fused.token_ids != expected.token_ids).nonzero().flatten().tolist()}")
    torch.testing.assert_close(fused.logprobs, expected.logprobs, atol=atol, rtol=0)
    finite = torch.isfinite(expected.top_logprobs)
    assert torch.equal(torch.isfinite(fused.top_logprobs), finite)
    torch.testing.assert_close(fused.top_logprobs[finite], expected.top_logprobs[finite], atol=atol, rtol=0)
    assert torch.equal(fused.top_ids[finite], expected.top_ids[finite])
    for row in fused.top_ids.tolist():
        assert len(set(row)) == len(row)


@pytest.fixture(params=["one_chunk", "split"])
def layout(request, monkeypatch):
    """"split": chunks of 512 tokens and room for 16 candidates, so that every row spans several chunk programs
    and some threshold searches finish over the whole row (more tokens left than room for candidates)."""
    if request.param == "split":
        monkeypatch.setattr(filtered_sampling, "CHUNK", 512)
        monkeypatch.setattr(filtered_sampling, "CAP", 16)


def combination_rows(vocab, seed):
    """Settings for rows covering every combination of top-k, top-p, min-p and bans (and extremes)."""
    rnd = random.Random(seed)
    rows = []
    for top_k, top_p, min_p, ban in itertools.product([0, 1], [0, 1], [0, 1], [0, 1]):
        rows.append(dict(temperature=rnd.choice([0.0, 0.6, 1.0, 1.7]), raw=rnd.random() < 0.3,
                         top_k=rnd.choice([1, 2, 7, 60, vocab - 1]) if top_k else 0,
                         top_p=rnd.choice([1e-6, 0.3, 0.9, 0.999]) if top_p else 1.0,
                         min_p=rnd.choice([0.05, 0.3, 0.99]) if min_p else 0.0, ban=ban))
    return rows


def tensors_for(rows, logits, k, seed):
    n, vocab = logits.shape
    rnd = random.Random(seed)
    banned = [(r, rnd.randrange(vocab)) for r, cfg in enumerate(rows) if cfg["ban"] for _ in range(4)]
    banned += [(r, int(logits[r].argmax())) for r, cfg in enumerate(rows) if cfg["ban"] and r % 2]
    settings = {key: [cfg[key] for cfg in rows] for key in ("temperature", "raw", "top_k", "top_p", "min_p")}
    return make_tensors(n, seeds=torch.arange(n) * 1000003 + seed, steps=torch.arange(n) % 7, k=k, vocab=vocab,
                        banned=banned, **settings)


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
@pytest.mark.parametrize("k, layout", [(0, "one_chunk"), (5, "one_chunk"), (5, "split")], indirect=["layout"])
def test_every_filter_combination_gives_torch_samples_tokens_and_logprobs(ties, k, layout):
    vocab = 1500
    rows = combination_rows(vocab, seed=k + 2 * ties)
    logits = random_logits(81 + k + ties, len(rows), vocab, scale=3.0)
    if ties:
        logits = (logits * 2).round() / 2 + 0.25  # ~40 distinct values, none 0
    t = tensors_for(rows, logits, k, seed=k)
    expected = torch_sample(logits, t)
    assert len(set(expected.token_ids.tolist())) > len(rows) // 2
    assert_agree(fused_filtered_sample(logits.to(DEVICE), on_device(t)), on_device(expected))


@pytest.mark.parametrize("layout", ["split"], indirect=True)
def test_ties_at_the_boundaries_keep_the_smallest_token_ids(layout):
    """Eight tokens tie for the top (ids 10, 20, .., 80): top-k 3 keeps ids 10, 20, 30; top-p 0.3 keeps
    those whose mass before them (0, 1/8, 1/4 of the tied mass ~ the whole) is below 0.3: the same three."""
    vocab, n = 1024, 16
    logits = torch.full((n, vocab), -30.0) + torch.linspace(-1, 0, vocab)  # far below the tie, all distinct
    logits[:, 10:90:10] = 5.0
    t = make_tensors(n, top_k=[3, 0] * (n // 2), top_p=[1.0, 0.3] * (n // 2), seeds=torch.arange(n) * 31 + 7,
                     k=4, vocab=vocab)
    for out in (torch_sample(logits, t), fused_filtered_sample(logits.to(DEVICE), on_device(t))):
        assert set(out.token_ids.tolist()) == {10, 20, 30}
        assert out.top_ids[:, :3].tolist() == [[10, 20, 30]] * n
        torch.testing.assert_close(out.top_logprobs[:, :3].cpu(), torch.full((n, 3), -math.log(3)), atol=1e-6,
                                   rtol=0)
        assert (out.top_logprobs[:, 3] == NEG_INF).all()


def test_padding_ban_pairs_ban_nothing():
    vocab = 1000
    logits = random_logits(91, 4, vocab)
    top = logits.argmax(dim=-1)
    t = make_tensors(4, temperature=0.0, banned=[(1, int(top[1])), (-1, int(top[0])), (-1, 0)], vocab=vocab, k=2)
    for out in (torch_sample(logits, t), fused_filtered_sample(logits.to(DEVICE), on_device(t))):
        assert out.token_ids[[0, 2, 3]].tolist() == top[[0, 2, 3]].tolist()
        assert out.token_ids[1].item() == logits[1].topk(2).indices[1].item()


# --------------------------------------------------------------------------------------------
# Penalties
# --------------------------------------------------------------------------------------------


def reference_penalized(logits, prompts, outputs, repetition, presence, frequency):
    """vLLM's penalties in float64, token by token from the definitions."""
    x = logits.double().clone()
    for r in range(x.shape[0]):
        for tok in set(prompts[r]) | set(outputs[r]):
            x[r, tok] = x[r, tok] / repetition[r] if x[r, tok] > 0 else x[r, tok] * repetition[r]
        for tok in set(outputs[r]):
            x[r, tok] -= frequency[r] * outputs[r].count(tok) + presence[r]
    return x


def penalty_case(vocab, rows=6, seed=5):
    rnd = random.Random(seed)
    prompts = [[rnd.randrange(vocab) for _ in range(12)] for _ in range(rows)]
    outputs = [[rnd.randrange(vocab) for _ in range(6)] * 2 + [rnd.randrange(vocab)] for _ in range(rows)]
    for r in range(rows):  # the most likely tokens are penalized too
        outputs[r] += [r, r]
    repetition = [1.0, 1.3, 0.8, 1.0, 2.0, 1.1][:rows]
    presence = [0.0, 0.0, 0.5, -0.4, 1.0, 0.2][:rows]
    frequency = [0.0, 0.7, 0.0, 0.3, -0.5, 0.2][:rows]
    logits = random_logits(seed, rows, vocab, scale=2.0)
    logits[torch.arange(rows), torch.arange(rows)] = 9.0
    state = penalty_tensors(prompts, outputs, repetition, presence, frequency, vocab)
    reference = reference_penalized(logits, prompts, outputs, repetition, presence, frequency)
    return logits, state, reference


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
def test_penalties_match_float64_reference(fused):
    vocab = 1200
    logits, state, reference = penalty_case(vocab)
    rows = logits.shape[0]
    greedy = make_tensors(rows, temperature=0.0, k=6, vocab=vocab)
    greedy.penalties = state
    scaled = make_tensors(rows, temperature=0.7, k=6, vocab=vocab, raw=[False, True] * 3)
    scaled.penalties = state
    for t, temperature in ((greedy, 1.0), (scaled, 0.7)):
        out = fused_filtered_sample(logits.to(DEVICE), on_device(t)) if fused else torch_sample(logits, t)
        out = type(out)(*(v.cpu() for v in vars(out).values()))
        processed = torch.log_softmax(reference / temperature, dim=-1)
        raw = torch.log_softmax(logits.double(), dim=-1)
        if t is greedy:
            assert torch.equal(out.token_ids, reference.argmax(dim=-1))
            assert not torch.equal(out.token_ids, logits.argmax(dim=-1))
        chosen = torch.where(t.use_raw[:, None], raw, processed)
        torch.testing.assert_close(out.logprobs.double(), chosen.gather(1, out.token_ids[:, None])[:, 0],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(out.top_logprobs.double(), chosen.sort(dim=-1, descending=True).values[:, :6],
                                   atol=1e-5, rtol=0)


def test_penalties_with_filters_fused_equals_torch():
    vocab = 1500
    logits, state, _ = penalty_case(vocab, seed=9)
    t = make_tensors(6, temperature=[0.0, 1.0, 0.8, 1.2, 1.0, 0.5], top_k=[0, 40, 0, 5, 0, 0],
                     top_p=[1.0, 0.9, 0.7, 1.0, 1.0, 0.95], min_p=[0.0, 0.0, 0.1, 0.0, 0.2, 0.0], k=3,
                     vocab=vocab, banned=[(1, 1), (3, 0)], seeds=torch.arange(6) + 77)
    t.penalties = state
    assert_agree(fused_filtered_sample(logits.to(DEVICE), on_device(t)), on_device(torch_sample(logits, t)))


def test_penalized_samples_follow_the_reference_distribution():
    """100k torch_sample draws (the fused sampler draws its tokens) against the float64 penalized softmax."""
    vocab, n = 50, 100_000
    logits, state, reference = penalty_case(vocab, rows=6, seed=13)
    row = 1  # repetition 1.3, frequency 0.7, presence 0
    one = PenaltyTensors(*(getattr(state, f)[row:row + 1].expand(n, *getattr(state, f).shape[1:]).contiguous()
                           for f in ("repetition", "presence", "frequency", "output_counts", "prompt_mask")))
    t = make_tensors(n, temperature=0.9, top_k=30, min_p=0.01, seeds=torch.arange(n) // 2 + 5,
                     steps=torch.arange(n) % 2, vocab=vocab)
    t.penalties = one
    out = sample(logits[row:row + 1].expand(n, -1).contiguous(), t)
    x = reference[row] / 0.9
    x[x.argsort(descending=True)[30:]] = NEG_INF
    probs = torch.softmax(x, dim=-1)
    probs[probs < 0.01 * probs.max()] = 0
    _check_empirical(out.token_ids, probs / probs.sum())


def test_record_tokens_counts_each_rows_token():
    counts = torch.zeros(3, 10, dtype=torch.int32)
    record_tokens(counts, torch.tensor([4, 4, 9]))
    record_tokens(counts, torch.tensor([4, 0, 9]))
    expected = torch.zeros(3, 10, dtype=torch.int32)
    expected[0, 4], expected[1, 4], expected[1, 0], expected[2, 9] = 2, 1, 1, 2
    assert torch.equal(counts, expected)


def test_penalty_tensors_of_the_wrong_shape_are_refused():
    logits, state, _ = penalty_case(100)
    t = make_tensors(logits.shape[0], vocab=100)
    t.penalties = PenaltyTensors(state.repetition, state.presence, state.frequency, state.output_counts[:, :50],
                                 state.prompt_mask)
    with pytest.raises(ValueError, match=r"output_counts must be a contiguous torch.int32 tensor of shape \(6, 100\)"):
        torch_sample(logits, t)


# --------------------------------------------------------------------------------------------
# Native GPU: the vocabulary and batch sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64, 512])
def test_gpu_fused_picks_torch_samplers_tokens_at_full_vocabulary(rows, dtype):
    vocab = 151936
    rnd = random.Random(rows)
    gen = torch.Generator(device="cuda").manual_seed(rows)
    logits = (torch.randn(rows, vocab, device="cuda", generator=gen) * rnd.choice([1.0, 3.0])).to(dtype)
    settings = dict(
        temperature=[rnd.choice([0.0, 0.6, 1.0, 1.3]) for _ in range(rows)],
        top_k=[rnd.choice([0, 1, 20, 50, 1000, 100000]) for _ in range(rows)],
        top_p=[rnd.choice([1.0, 0.5, 0.9, 0.95, 0.999]) for _ in range(rows)],
        min_p=[rnd.choice([0.0, 0.0, 0.05, 0.5]) for _ in range(rows)],
        raw=[rnd.random() < 0.3 for _ in range(rows)],
    )
    banned = [(r, rnd.randrange(vocab)) for r in range(rows) for _ in range(rnd.choice([0, 2]))]
    t = on_device(make_tensors(rows, seeds=torch.arange(rows) * 7919 + 1, k=5, vocab=vocab, banned=banned,
                               **settings))
    fused, expected = sample(logits, t), torch_sample(logits, t)
    # a token within float32 rounding of a filter boundary may be decided either way: at most 1 row in 500
    differ = (fused.token_ids != expected.token_ids).sum().item()
    assert differ <= rows // 500, differ
    same = fused.token_ids == expected.token_ids
    torch.testing.assert_close(fused.logprobs[same], expected.logprobs[same], atol=1e-4, rtol=0)
    finite = torch.isfinite(expected.top_logprobs) & same[:, None]
    torch.testing.assert_close(fused.top_logprobs[finite], expected.top_logprobs[finite], atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_filtered_sampler_runs_in_a_cuda_graph_without_host_sync():
    """Captured with every feature on (filters, bans padded with row -1, penalties, top logprobs); the replay
    equals eager, and neither synchronizes with the host."""
    rows, vocab = 64, 151936
    logits = torch.randn(rows, vocab, device="cuda") * 3
    settings = combination_rows(vocab, seed=3) * (rows // 16)
    t = on_device(tensors_for(settings, logits.cpu(), 5, seed=3))
    t.banned_rows = torch.cat([t.banned_rows, torch.full((8,), -1, device="cuda")])
    t.banned_cols = torch.cat([t.banned_cols, torch.zeros(8, dtype=torch.int64, device="cuda")])
    _, state, _ = penalty_case(vocab, rows=6)
    t.penalties = PenaltyTensors(*(getattr(state, f).repeat(11, *[1] * (getattr(state, f).dim() - 1))[:rows]
                                   .contiguous().cuda()
                                   for f in ("repetition", "presence", "frequency", "output_counts", "prompt_mask")))
    eager = sample(logits, t)  # compiles the kernels
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            captured = sample(logits, t)
        sample(logits, t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    logits.mul_(1.0)  # same inputs; replay recomputes everything
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(vars(captured).values(), vars(eager).values()):
        assert torch.equal(a, b)
    assert_agree(eager, torch_sample(logits, t), atol=1e-4)
