"""Bad input gets a specific error before any work starts, and the engine stays usable."""

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
        ([[]], "prompt 0 is empty"),
        ([[1, 2], list(range(1, 65))], "prompt 1 has 64 tokens; with max_model_len=64 a prompt may have at most 63"),
        ([[1, 384]], r"prompt 0 has token ids outside \[0, 384\): \[384\]"),
        ([[1, -3]], "outside"),
        ([[1, 2.5]], "outside"),
        ([[1, 2, 3]][0], "wrap a single token-id prompt"),
        (["hello"], "prompt 0 is a string, but the checkpoint has no tokenizer"),
        ([{"ids": [1]}], "prompt 0 is a dict"),
    ],
)
def test_bad_prompt(engine, prompts, match):
    with pytest.raises(InvalidRequestError, match=match):
        engine.generate(prompts, GOOD, use_tqdm=False)
    assert engine.core.has_work() is False
    assert len(engine.generate([[1, 2, 3]], GOOD, use_tqdm=False)[0].samples[0].token_ids) == 5


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
    ],
)
def test_bad_sampling_params(fields, match):
    with pytest.raises(ValidationError, match=match):
        SamplingParams(**fields)


def test_request_level_param_errors(engine):
    with pytest.raises(InvalidRequestError, match="stop strings, but the checkpoint has no tokenizer"):
        engine.generate([[1, 2]], SamplingParams(stop=["x"]), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="stop_token_ids outside"):
        engine.generate([[1, 2]], SamplingParams(stop_token_ids=[1000]), use_tqdm=False)
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
