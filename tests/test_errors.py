"""Bad input gets a specific error before any work starts, and the engine stays usable."""

import numpy as np
import pytest
from pydantic import ValidationError

from rollout import EngineConfig, InvalidRequestError, RolloutEngine, SamplingParams

GOOD = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(checkpoint_dir):
    return RolloutEngine(model=str(checkpoint_dir("qwen3")), device="cpu", num_kv_blocks=32, max_model_len=64)


@pytest.mark.parametrize(
    "prompts, match",
    [
        ([[]], "prompt 0: no tokens"),
        ([[1, 2], list(range(1, 65))], "prompt 1: 64 tokens; with max_model_len=64 a prompt may have at most 63"),
        ([[1, 384]], r"prompt 0: token ids must be in \[0, 384\); got \[384\]"),
        ([[1, -3]], r"must be in \[0, 384\); got \[-3\]"),
        ([[1, 2], [3, 2.5]], "prompt 1: token ids must be ints; got float 2.5 at position 1"),
        ([[1, np.float32(5.0)]], "prompt 0: token ids must be ints; got float32"),
        ([[True, 5]], "prompt 0: token ids must be ints; got bool True at position 0"),
        ([["5"]], "token ids must be ints; got str '5'"),
        ([[1, None]], "token ids must be ints; got NoneType"),
        ([[1, np.int64(384)]], r"must be in \[0, 384\)"),
        ([[1, 2, 3]][0], "wrap a single token-id prompt"),
        ([np.int64(1), np.int64(2)], "wrap a single token-id prompt"),
        (["hello"], "prompt 0: a string, but the checkpoint has no tokenizer"),
        ([{"ids": [1]}], "prompt 0: a dict"),
    ],
)
def test_bad_prompt(engine, prompts, match):
    with pytest.raises(InvalidRequestError, match=match):
        engine.generate(prompts, GOOD, use_tqdm=False)
    assert engine.core.has_work() is False
    assert len(engine.generate([[1, 2, 3]], GOOD, use_tqdm=False)[0].samples[0].token_ids) == 5


def test_numpy_integer_token_ids_are_ints(engine):
    """numpy integers are taken as the ints they hold: the same output as plain ints."""
    ids = np.array([7, 300, 12], dtype=np.int64)
    [out] = engine.generate([list(ids)], GOOD, use_tqdm=False)
    assert out.prompt_token_ids == [7, 300, 12] and all(type(t) is int for t in out.prompt_token_ids)
    assert out.samples == engine.generate([[7, 300, 12]], GOOD, use_tqdm=False)[0].samples


@pytest.mark.parametrize(
    "sampling_params, match",
    [
        ({"temperature": 0}, "sampling_params must be a SamplingParams, a list of one per prompt, or None; got dict"),
        ("abc", "got str"),
        (5, "got int"),
        ([{"temperature": 0}], r"sampling_params\[0\] is a dict, not a SamplingParams"),
        ([GOOD, GOOD], "got 2 SamplingParams for 1 prompts"),
    ],
)
def test_bad_sampling_params_argument(engine, sampling_params, match):
    with pytest.raises(InvalidRequestError, match=match):
        engine.generate([[1, 2]], sampling_params, use_tqdm=False)
    assert engine.core.has_work() is False


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(n=0), "n"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k must be -1 or 0"),
        (dict(min_p=2.0), "min_p"),
        (dict(min_tokens=9, max_tokens=3), "min_tokens=9 must not exceed max_tokens=3"),
        (dict(logprobs_mode="weird"), "logprobs_mode"),
        (dict(stop=[""]), "stop strings must be non-empty"),
        (dict(bogus=1), "bogus"),
        (dict(n=True), "n\n.*expected an integer, got bool True"),
        (dict(n=2.0), "expected an integer, got float 2.0"),
        (dict(max_tokens="8"), "expected an integer, got str '8'"),
        (dict(stop_token_ids=[3, True]), "stop_token_ids.1\n.*expected an integer, got bool"),
        (dict(temperature="0.5"), "temperature\n.*expected a number, got str"),
        (dict(top_p=True), "top_p\n.*expected a number, got bool"),
    ],
)
def test_bad_sampling_params(fields, match):
    with pytest.raises(ValidationError, match=match):
        SamplingParams(**fields)


def test_request_level_param_errors(engine):
    with pytest.raises(InvalidRequestError, match="prompt 0: stop strings need a tokenizer, and the checkpoint"):
        engine.generate([[1, 2]], SamplingParams(stop=["x"]), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match=r"prompt 1: stop_token_ids must be in \[0, 384\); got \[1000\]"):
        engine.generate([[1, 2], [3]], [GOOD, SamplingParams(stop_token_ids=[1000])], use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="got 1 SamplingParams for 2 prompts"):
        engine.generate([[1], [2]], [GOOD], use_tqdm=False)
    assert engine.generate([[1], [2]], [GOOD, GOOD], use_tqdm=False)[1].samples[0].finish_reason == "length"


def test_bad_engine_config(checkpoint_dir):
    path = str(checkpoint_dir("qwen3"))
    with pytest.raises(ValidationError, match="device must be"):
        EngineConfig(model=path, device="tpu")
    with pytest.raises(ValidationError, match="max_num_seqs"):
        EngineConfig(model=path, max_num_seqs=0)
    with pytest.raises(ValidationError, match="cannot hold one sequence of max_model_len=64"):
        EngineConfig(model=path, num_kv_blocks=2, max_model_len=64)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=512"):
        RolloutEngine(model=path, device="cpu", max_model_len=4096)
    with pytest.raises(TypeError, match="either an EngineConfig or keyword fields"):
        RolloutEngine(EngineConfig(model=path), device="cpu")


def test_config_object_and_kwargs_agree(checkpoint_dir):
    path = str(checkpoint_dir("qwen3"))
    a = RolloutEngine(EngineConfig(model=path, device="cpu", num_kv_blocks=32))
    b = RolloutEngine(model=path, device="cpu", num_kv_blocks=32)
    assert a.generate([[5, 6]], GOOD, use_tqdm=False)[0].samples == b.generate([[5, 6]], GOOD, use_tqdm=False)[0].samples


def test_outputs_keep_prompt_order(engine):
    prompts = [[7] * k for k in (9, 1, 30, 4)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (3, 8, 1, 5)]
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert [len(o.samples[0].token_ids) for o in outs] == [3, 8, 1, 5]
    assert len({o.request_id for o in outs}) == 4


def test_max_model_len_caps_generation(engine):
    out = engine.generate([list(range(1, 61))], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                          use_tqdm=False)
    assert len(out[0].samples[0].token_ids) == 4 and out[0].samples[0].finish_reason == "length"
