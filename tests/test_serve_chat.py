"""`/v1/chat/completions` with the `openai` client: the prompt is the ChatML the template renders (checked against
a hand-written string), outputs equal a synchronous engine's, earlier turns' token ids are reused as they are,
`<tool_call>` blocks are parsed into tool_calls, and a checkpoint without a template gets a clear 400."""

import asyncio

import openai
import pytest
from transformers import AutoTokenizer

from rollout import RolloutEngine, SamplingParams
from rollout.serve.chat import parse_tool_calls, render
from rollout.serve.errors import APIError
from serve_helpers import serving

CONFIG = dict(device="cpu", dtype="float32", max_num_seqs=32, max_num_batched_tokens=256, seed=3)
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2+3?"}]
CHATML = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "evaluate arithmetic",
                                           "parameters": {"type": "object",
                                                          "properties": {"expression": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def live(text_checkpoint):
    yield from serving(text_checkpoint, CONFIG, model_name="tiny")


@pytest.fixture(scope="module")
def tokenizer(text_checkpoint):
    return AutoTokenizer.from_pretrained(str(text_checkpoint))


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def test_chat_equals_engine_on_the_rendered_prompt(client, tokenizer, text_checkpoint):
    prompt = tokenizer.encode(CHATML, add_special_tokens=False)
    engine = RolloutEngine(model=str(text_checkpoint), **CONFIG)
    want = engine.generate([prompt], SamplingParams(max_tokens=10, seed=4, ignore_eos=True, logprobs=True))[0]
    engine.shutdown()
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, seed=4, logprobs=True,
                                         extra_body=dict(ignore_eos=True, return_token_ids=True))
    choice = got.choices[0]
    assert choice.prompt_token_ids == prompt and choice.token_ids == want.samples[0].token_ids
    assert choice.message.content == want.samples[0].text and choice.message.role == "assistant"
    assert len(choice.logprobs.content) == 10 and got.usage.prompt_tokens == len(prompt)


def test_stream_async_and_continuation_reuses_ids(live, tokenizer):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        body = dict(ignore_eos=True, return_token_ids=True)
        first = await client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, seed=2,
                                                     extra_body=body)
        pieces, ids = [], []
        async for chunk in await client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8,
                                                                seed=2, stream=True, extra_body=body):
            pieces.append(chunk.choices[0].delta.content or "")
            ids += chunk.choices[0].token_ids
        c = first.choices[0]
        turn2 = MESSAGES + [{"role": "assistant", "content": c.message.content}, {"role": "user", "content": "ok"}]
        second = await client.chat.completions.create(
            model="tiny", messages=turn2, max_tokens=4, extra_body=dict(body, prefix_token_ids=c.prompt_token_ids
                                                                          + c.token_ids))
        return first, "".join(pieces), ids, second
    first, streamed_text, streamed_ids, second = asyncio.run(main())
    c = first.choices[0]
    assert streamed_ids == c.token_ids and streamed_text == c.message.content
    prefix = c.prompt_token_ids + c.token_ids
    assert second.choices[0].prompt_token_ids[:len(prefix)] == prefix
    tail = tokenizer.decode(second.choices[0].prompt_token_ids[len(prefix):])
    assert tail == "<|im_end|>\n<|im_start|>user\nok<|im_end|>\n<|im_start|>assistant\n"


def test_tools_are_rendered_and_tool_calls_parsed(client, tokenizer):
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=2,
                                         extra_body=dict(return_token_ids=True))
    rendered = tokenizer.decode(got.choices[0].prompt_token_ids)
    assert rendered.startswith("<|im_start|>system\n# Tools\n<tools>") and '"name": "calculator"' in rendered
    text = 'Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>'
    content, calls = parse_tool_calls(text, "call-x")
    assert content == "Let me compute."
    assert calls == [{"id": "call-x-0", "type": "function",
                      "function": {"name": "calculator", "arguments": '{"expression": "2+3"}'}}]
    assert parse_tool_calls("<tool_call>{not json}</tool_call>", "c") == ("<tool_call>{not json}</tool_call>", [])
    assert parse_tool_calls("plain answer", "c") == ("plain answer", [])


def test_no_template_and_bad_prefix_are_400(client, tokenizer):
    bare = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(APIError, match="no chat template") as err:
        render(bare, MESSAGES, None, {}, None)
    assert err.value.status == 400
    with pytest.raises(openai.BadRequestError, match="prefix_token_ids"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, extra_body=dict(prefix_token_ids=[7, 8, 9]))


class ScriptedEngine:
    """An engine whose every reply is the tokens of one text, two tokens a delta (for the tool-call routes)."""

    weight_version = 0

    def __init__(self, tokenizer, reply: str):
        self.tokenizer, self.ids = tokenizer, tokenizer.encode(reply, add_special_tokens=False)

    async def generate_stream(self, prompt, params, request_id=None, *, partial=None):
        from rollout import SampleDelta

        for k in range(0, len(self.ids), 2):
            piece = self.ids[k:k + 2]
            yield SampleDelta(request_id=request_id, index=0, token_ids=piece, weight_versions=[0] * len(piece),
                              finish_reason="stop" if k + 2 >= len(self.ids) else None)

    async def generate(self, prompt, params, request_id=None, *, partial=None):
        from rollout import RolloutOutput, Sample

        sample = Sample(token_ids=self.ids, finish_reason="stop", weight_version=0, token_weight_versions=[0] * len(
            self.ids), text=self.tokenizer.decode(self.ids, skip_special_tokens=True))
        return RolloutOutput(request_id=request_id, prompt_token_ids=prompt, samples=[sample])


def test_tool_calls_parsed_whole_and_streamed(tokenizer):
    import json

    import httpx

    from rollout.serve import build_app

    reply = 'Sure.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>'
    app = build_app(ScriptedEngine(tokenizer, reply), "tiny")
    body = {"messages": MESSAGES, "tools": TOOLS}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            whole = (await client.post("/v1/chat/completions", json=body)).json()
            streamed = (await client.post("/v1/chat/completions", json=dict(body, stream=True))).text
        return whole, streamed
    whole, streamed = asyncio.run(go())
    call = {"id": "call-chatcmpl-1-0-0", "type": "function",
            "function": {"name": "calculator", "arguments": '{"expression": "2+3"}'}}
    choice = whole["choices"][0]
    assert choice["message"]["content"] == "Sure." and choice["message"]["tool_calls"] == [call]
    assert choice["finish_reason"] == "tool_calls"
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == reply
    last = events[-1]["choices"][0]
    assert last["finish_reason"] == "tool_calls"
    assert last["delta"]["tool_calls"] == [dict(call, id="call-chatcmpl-2-0-0", index=0)]
    assert streamed.rstrip().endswith("data: [DONE]")
