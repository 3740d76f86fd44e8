"""`POST /v1/chat/completions`: the chat template, tool calls parsed into `tool_calls`, token ids on request."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from rollout.outputs import Sample
from rollout.serve.state import state
from rollout.serve.chat import parse_tool_calls, render
from rollout.serve.errors import error_body, status_of
from rollout.serve.openai_routes import check_model, token_text, usage
from rollout.serve.protocol import ChatCompletionRequest
from rollout.serve.streams import Detokenizer, Job, MergedStreams, finite, generate_all, sse, unless_client_leaves

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """Completions of a conversation. A reply whose text holds `<tool_call>` JSON blocks comes back with
    `tool_calls` (finish_reason "tool_calls"); streamed, the chunks carry the raw text and the last one the parsed
    tool calls."""
    s = state(request)
    check_model(s, body.model)
    tokenizer = s.engine.tokenizer
    tools = None if body.tool_choice == "none" else body.tools
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    prompt = render(tokenizer, messages, tools, body.chat_template_kwargs, body.prefix_token_ids)
    params = body.sampling_params((body.top_logprobs or 0) if body.logprobs else None)
    rid = body.request_id or s.new_id("chatcmpl")
    job = Job(prompt, params, rid, rid)
    if body.stream:
        streams = MergedStreams(s.engine, s, [job])
        await streams.start()
        return StreamingResponse(_events(s, body, rid, streams, prompt, tools, tokenizer),
                                 media_type="text/event-stream")
    (output,) = await unless_client_leaves(request.receive, generate_all(s.engine, s, [job]))
    choices = [_choice(j, sample, prompt, body, tools, rid, tokenizer) for j, sample in enumerate(output.samples)]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": s.model_name,
            "choices": choices, "usage": usage(len(prompt), sum(len(x.token_ids) for x in output.samples))}


def _choice(index: int, sample: Sample, prompt: list[int], body: ChatCompletionRequest, tools, rid, tokenizer):
    text, finish = sample.text or "", sample.finish_reason
    content, calls = parse_tool_calls(text, f"call-{rid}-{index}") if tools else (text, [])
    if calls and finish == "stop":
        finish = "tool_calls"
    message = {"role": "assistant", "content": content, "tool_calls": calls}
    choice = {"index": index, "message": message, "finish_reason": finish, "stop_reason": sample.stop_reason,
              "weight_version": sample.weight_version,
              "logprobs": _logprobs(sample.token_ids, sample.logprobs, sample.top_logprobs, tokenizer)
              if body.logprobs else None}
    if body.return_token_ids:
        choice.update(prompt_token_ids=prompt, token_ids=sample.token_ids, weight_versions=sample.token_weight_versions)
    return choice


def _logprobs(token_ids, logprobs, top_logprobs, tokenizer) -> dict:
    """The chat logprobs object: per token its text, logprob, bytes and top alternatives."""
    content = []
    for k, (token, lp) in enumerate(zip(token_ids, logprobs or [])):
        text = token_text(tokenizer, token)
        tops = [] if top_logprobs is None else [
            {"token": token_text(tokenizer, t), "logprob": finite(v), "bytes": list(token_text(tokenizer, t).encode())}
            for t, v in top_logprobs[k].items()]
        content.append({"token": text, "logprob": finite(lp), "bytes": list(text.encode()), "top_logprobs": tops})
    return {"content": content}


async def _events(s, body: ChatCompletionRequest, rid: str, streams: MergedStreams, prompt: list[int], tools,
                  tokenizer):
    """SSE chunks of a streamed reply (its raw text; the parsed tool calls on the last chunk), then [DONE]."""
    created, detok, completion_tokens = int(time.time()), {}, 0
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": s.model_name}
    try:
        async for _, delta in streams:
            first = delta.index not in detok
            d = detok.setdefault(delta.index, Detokenizer(tokenizer))
            text = d.add(delta.token_ids) + (d.finish() if delta.finish_reason else "")
            completion_tokens += len(delta.token_ids)
            message = {"content": text, **({"role": "assistant"} if first else {})}
            finish = delta.finish_reason
            if finish is not None and tools:  # the whole reply is in: its tool calls go on the last chunk
                _, calls = parse_tool_calls(d.emitted, f"call-{rid}-{delta.index}")
                if calls:
                    message["tool_calls"] = [dict(call, index=k) for k, call in enumerate(calls)]
                    finish = "tool_calls" if finish == "stop" else finish
            choice = {"index": delta.index, "delta": message, "finish_reason": finish,
                      "logprobs": _logprobs(delta.token_ids, delta.logprobs, delta.top_logprobs, tokenizer)
                      if body.logprobs else None}
            if body.return_token_ids:
                choice.update(token_ids=delta.token_ids, weight_versions=delta.weight_versions,
                              **({"prompt_token_ids": prompt} if first else {}))
            yield sse({**head, "choices": [choice]})
        if body.stream_options and body.stream_options.include_usage:
            yield sse({**head, "choices": [], "usage": usage(len(prompt), completion_tokens)})
    except Exception as exc:  # the response has started: the error goes in the stream
        yield sse(error_body(status_of(exc) or 500, " ".join(str(exc).split())))
    yield sse("[DONE]")
