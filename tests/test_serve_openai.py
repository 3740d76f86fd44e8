"""`/v1/completions` through the official `openai` client (sync and async, streamed and not) against a live
server: the tokens, logprobs and text equal a synchronous RolloutEngine's on the same checkpoint and seeds."""

import asyncio

import openai
import pytest
import torch

from rollout import RolloutEngine, SamplingParams
from serve_helpers import serving

CONFIG = dict(device="cpu", dtype="float32", max_num_seqs=32, max_num_batched_tokens=256, seed=3)
PROMPTS = [[5, 17, 99, 200, 31], [44, 8, 301, 12]]


@pytest.fixture(scope="module")
def live(text_checkpoint):
    yield from serving(text_checkpoint, CONFIG, model_name="tiny")


@pytest.fixture(scope="module")
def reference(text_checkpoint):
    engine = RolloutEngine(model=str(text_checkpoint), **CONFIG)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def close(got, want):
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               atol=1e-4, rtol=0)


def test_token_prompts_n_logprobs_token_ids(client, reference):
    want = reference.generate(PROMPTS, SamplingParams(n=2, max_tokens=8, seed=11, logprobs=True, top_logprobs=2,
                                                      ignore_eos=True, top_k=50))
    got = client.completions.create(model="tiny", prompt=PROMPTS, n=2, max_tokens=8, seed=11, logprobs=2,
                                    extra_body=dict(ignore_eos=True, top_k=50, return_token_ids=True))
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    for choice in got.choices:
        output, sample = want[choice.index // 2], want[choice.index // 2].samples[choice.index % 2]
        assert choice.token_ids == sample.token_ids and choice.prompt_token_ids == output.prompt_token_ids
        assert choice.text == sample.text and choice.finish_reason == "length"
        close(choice.logprobs.token_logprobs, sample.logprobs)
        assert len(choice.logprobs.top_logprobs) == 8 and all(len(t) <= 2 for t in choice.logprobs.top_logprobs)
        assert choice.weight_versions == [0] * 8
    assert got.usage.completion_tokens == 32 and got.usage.prompt_tokens == 9


def test_text_prompt_streamed_equals_whole(client, reference):
    params = SamplingParams(max_tokens=12, seed=5, temperature=0.8, top_p=0.9, ignore_eos=True)
    want = reference.generate(["hello there"], params)[0].samples[0]
    chunks = list(client.completions.create(model="tiny", prompt="hello there", max_tokens=12, seed=5,
                                            temperature=0.8, top_p=0.9, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body=dict(ignore_eos=True, return_token_ids=True)))
    usage = chunks[-1].usage
    chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert [t for c in chunks for t in c.choices[0].token_ids] == want.token_ids
    assert chunks[-1].choices[0].finish_reason == "length"
    assert usage.completion_tokens == 12
    whole = client.completions.create(model="tiny", prompt="hello there", max_tokens=12, seed=5, temperature=0.8,
                                      top_p=0.9, extra_body=dict(ignore_eos=True))
    assert whole.choices[0].text == want.text


def test_async_client_stream_and_not(live, reference):
    params = SamplingParams(max_tokens=6, seed=9, min_p=0.05, ignore_eos=True, stop_token_ids=[17])
    want = [o.samples[0] for o in reference.generate(PROMPTS, params)]

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        body = dict(ignore_eos=True, min_p=0.05, stop_token_ids=[17], return_token_ids=True)
        whole = [client.completions.create(model="tiny", prompt=p, max_tokens=6, seed=9, extra_body=body)
                 for p in PROMPTS]

        async def stream(p):
            out = []
            async for chunk in await client.completions.create(model="tiny", prompt=p, max_tokens=6, seed=9,
                                                               stream=True, extra_body=body):
                out += chunk.choices[0].token_ids
            return out
        return await asyncio.gather(*whole), await asyncio.gather(*[stream(p) for p in PROMPTS])

    whole, streamed = asyncio.run(main())
    assert [w.choices[0].token_ids for w in whole] == [s.token_ids for s in want]
    assert streamed == [s.token_ids for s in want]


def test_bad_requests_are_400(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt=[1, 2], max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="token"):
        client.completions.create(model="tiny", prompt=[1, 10**6])
    with pytest.raises(openai.NotFoundError, match="tiny"):
        client.completions.create(model="other", prompt=[1, 2])
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        client.completions.create(model="tiny", prompt=[1, 2], frequency_penalty=2.5)
    with pytest.raises(openai.BadRequestError, match="repetition_penalty"):
        client.completions.create(model="tiny", prompt=[1, 2], extra_body=dict(repetition_penalty=0))


def test_penalties_reach_the_engine(client, reference):
    params = SamplingParams(max_tokens=10, seed=4, ignore_eos=True, logprobs=True, presence_penalty=0.5,
                            frequency_penalty=1.0, repetition_penalty=1.4)
    want = reference.generate(PROMPTS[:1], params)[0].samples[0]
    plain = reference.generate(PROMPTS[:1], SamplingParams(max_tokens=10, seed=4, ignore_eos=True, logprobs=True))
    assert want.logprobs != pytest.approx(plain[0].samples[0].logprobs, abs=1e-3)
    got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=10, seed=4, logprobs=0,
                                    presence_penalty=0.5, frequency_penalty=1.0,
                                    extra_body=dict(ignore_eos=True, repetition_penalty=1.4, return_token_ids=True))
    assert got.choices[0].token_ids == want.token_ids
    close(got.choices[0].logprobs.token_logprobs, want.logprobs)


def test_echo_scores_the_prompt_without_generating(client, reference):
    """echo=True, max_tokens=0, logprobs=2 (how evaluation harnesses score a text): the prompt's tokens with their
    logprobs (the first None) and top 2, equal to the engine's prompt_logprobs; the text is the prompt's."""
    want = reference.generate(PROMPTS, SamplingParams(max_tokens=0, prompt_logprobs=2))
    got = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=0, echo=True, logprobs=2)
    for choice, output in zip(got.choices, want):
        tokens = [reference.tokenizer.decode([t]) for t in output.prompt_token_ids]
        assert choice.text == "".join(tokens) and choice.logprobs.tokens == tokens
        assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
        close(choice.logprobs.token_logprobs[1:], output.prompt_logprobs)
        for top, expected in zip(choice.logprobs.top_logprobs[1:], output.prompt_top_logprobs):
            assert list(top) == [reference.tokenizer.decode([t]) for t in expected]
            close(list(top.values()), list(expected.values()))
    assert got.usage.completion_tokens == 0 and got.usage.prompt_tokens == 9


def test_echo_with_a_completion_puts_the_prompt_first(client, reference):
    params = SamplingParams(max_tokens=6, seed=8, ignore_eos=True, logprobs=True, prompt_logprobs=0)
    want = reference.generate(["hello there"], params)[0]
    got = client.completions.create(model="tiny", prompt="hello there", max_tokens=6, seed=8, echo=True, logprobs=0,
                                    extra_body=dict(ignore_eos=True))
    choice, sample = got.choices[0], want.samples[0]
    assert choice.text == "hello there" + sample.text
    assert len(choice.logprobs.tokens) == len(want.prompt_token_ids) + 6
    close(choice.logprobs.token_logprobs[1:], want.prompt_logprobs + sample.logprobs)
    plain = client.completions.create(model="tiny", prompt="hello there", max_tokens=3, seed=8, echo=True)
    assert plain.choices[0].text.startswith("hello there") and plain.choices[0].logprobs is None


def test_echo_refused_when_streaming(client):
    with pytest.raises(openai.BadRequestError, match="echo is not supported with stream=true"):
        client.completions.create(model="tiny", prompt=[1, 2], echo=True, stream=True)


def test_echo_scoring_with_stop_strings_generates_nothing(client, reference):
    """max_tokens=0 with stop strings (as loglikelihood requests send them): the text is the prompt alone."""
    got = client.completions.create(model="tiny", prompt="hello there", max_tokens=0, echo=True, logprobs=0,
                                    stop=["\n"])
    want = reference.generate(["hello there"], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert got.choices[0].text == "hello there" and got.usage.completion_tokens == 0
    assert len(got.choices[0].logprobs.tokens) == len(want.prompt_token_ids)
