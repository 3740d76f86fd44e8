"""OpenAI-compatible routes: `/v1/models`, `/v1/completions` (streaming or not)."""

from __future__ import annotations

import time
from typing import Optional

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from rollout.outputs import RolloutOutput, Sample
from rollout.serve.state import ServerState, state
from rollout.serve.errors import APIError, error_body, status_of
from rollout.serve.protocol import CompletionRequest
from rollout.serve.streams import Detokenizer, Job, MergedStreams, finite, generate_all, sse, unless_client_leaves

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request):
    """The one model served."""
    s = state(request)
    return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": s.created,
                                        "owned_by": "rollout-engine"}]}


def check_model(s: ServerState, model: Optional[str]) -> None:
    if model is not None and model != s.model_name:
        raise APIError(404, f"model {model!r} is not served here; this server serves {s.model_name!r}", "model")


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    """Completions of each prompt (text or token ids); choice index = prompt index * n + sample index."""
    s = state(request)
    check_model(s, body.model)
    params = body.completion_params()
    rid = body.request_id or s.new_id("cmpl")
    tokenizer = s.engine.tokenizer
    prompts = [tokenize(tokenizer, p, "prompt") for p in body.prompt]
    jobs = [Job(prompt, params, rid if len(prompts) == 1 else f"{rid}-{i}", rid) for i, prompt in enumerate(prompts)]
    if body.stream:
        streams = MergedStreams(s.engine, s, jobs)
        await streams.start()
        return StreamingResponse(_completion_events(s, body, rid, streams, prompts, tokenizer),
                                 media_type="text/event-stream")
    outputs = await unless_client_leaves(request.receive, generate_all(s.engine, s, jobs))
    choices, completion_tokens = [], 0
    for i, output in enumerate(outputs):
        for j, sample in enumerate(output.samples):
            choices.append(_choice(i * params.n + j, output, sample, body, tokenizer))
            completion_tokens += len(sample.token_ids)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": s.model_name,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def tokenize(tokenizer, prompt, field: str) -> list[int]:
    """A prompt's token ids (text is encoded as the engine would)."""
    if not isinstance(prompt, str):
        return prompt
    if tokenizer is None:
        raise APIError(400, f"{field} is text, but the checkpoint has no tokenizer; send token ids", field)
    return tokenizer.encode(prompt)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _choice(index: int, output: RolloutOutput, sample: Sample, body: CompletionRequest, tokenizer) -> dict:
    prompt_ids = output.prompt_token_ids
    text = sample.text or ""
    if body.echo:
        prompt = body.prompt[index // body.n]
        text = (prompt if isinstance(prompt, str) else "".join(token_text(tokenizer, t) for t in prompt)) + text
    choice = {"index": index, "text": text, "finish_reason": sample.finish_reason,
              "stop_reason": sample.stop_reason, "weight_version": sample.weight_version,
              "logprobs": _choice_logprobs(output, sample, body, tokenizer) if body.logprobs is not None else None}
    if body.return_token_ids:
        choice.update(prompt_token_ids=prompt_ids, token_ids=sample.token_ids,
                      weight_versions=sample.token_weight_versions)
    return choice


def _choice_logprobs(output: RolloutOutput, sample: Sample, body: CompletionRequest, tokenizer) -> dict:
    """The choice's logprobs object; with echo the prompt's tokens come first (the first one has no logprob)."""
    ids, logprobs, tops = sample.token_ids, sample.logprobs or [], sample.top_logprobs
    if body.echo:
        ids = output.prompt_token_ids + ids
        logprobs = [None] + output.prompt_logprobs + logprobs
        if body.logprobs:
            tops = [None] + output.prompt_top_logprobs + (tops or [])
    return _logprobs(ids, logprobs, tops, tokenizer, 0)


def token_text(tokenizer, token_id: int) -> str:
    """A token's text (its id as 'token_id:N' when the checkpoint has no tokenizer)."""
    return f"token_id:{token_id}" if tokenizer is None else tokenizer.decode([token_id])


def _logprobs(token_ids, logprobs, top_logprobs, tokenizer, offset: int) -> dict:
    """The OpenAI completions logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [token_text(tokenizer, t) for t in token_ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    tops = None if top_logprobs is None else [
        None if top is None else {token_text(tokenizer, t): finite(lp) for t, lp in top.items()}
        for top in top_logprobs]
    return {"tokens": tokens, "token_logprobs": [finite(lp) for lp in logprobs or []], "top_logprobs": tops,
            "text_offset": offsets}


async def _completion_events(s: ServerState, body: CompletionRequest, rid: str, streams: MergedStreams,
                             prompts: list[list[int]], tokenizer):
    """SSE chunks of a streamed completion: one per delta, the usage chunk if asked for, then [DONE]."""
    n, created = body.n, int(time.time())
    detok, offsets, completion_tokens = {}, {}, 0
    prompt_tokens = sum(len(p) for p in prompts)
    try:
        async for i, delta in streams:
            index = i * n + delta.index
            first = index not in detok
            d = detok.setdefault(index, Detokenizer(tokenizer))
            text = d.add(delta.token_ids) + (d.finish() if delta.finish_reason else "")
            completion_tokens += len(delta.token_ids)
            choice = {"index": index, "text": text, "finish_reason": delta.finish_reason,
                      "stop_reason": delta.stop_reason, "logprobs": None}
            if body.logprobs is not None:
                choice["logprobs"] = _logprobs(delta.token_ids, delta.logprobs, delta.top_logprobs, tokenizer,
                                               offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + sum(len(t) for t in choice["logprobs"]["tokens"])
            if body.return_token_ids:
                choice.update(token_ids=delta.token_ids, weight_versions=delta.weight_versions)
                if first:
                    choice["prompt_token_ids"] = prompts[i]
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": s.model_name,
                       "choices": [choice]})
        if body.stream_options and body.stream_options.include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": s.model_name,
                       "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    except Exception as exc:  # the response has started: the error goes in the stream
        yield sse(error_body(status_of(exc) or 500, " ".join(str(exc).split())))
    yield sse("[DONE]")
