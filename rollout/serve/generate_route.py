"""Token-in / token-out generation: `POST /generate` (SGLang's shape: `input_ids`, `sampling_params`, `rid`)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from rollout.outputs import Sample, encode_routed_experts
from rollout.serve.app import state
from rollout.serve.errors import error_body, status_of
from rollout.serve.protocol import GenerateRequest
from rollout.serve.streams import Job, MergedStreams, finite, generate_all, sse, unless_client_leaves

router = APIRouter()


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request):
    """Sample `sampling_params.n` completions of `input_ids`. Not streamed: one object per sample (a list when
    n > 1) with `output_ids`, `output_logprobs`, per-token `weight_versions`, `finish_reason`; with `partial`,
    the output holds the earlier tokens followed by the new ones. With `sampling_params.prompt_logprobs`, each
    object also has `input_logprobs` (every input token after the first) and `input_top_logprobs` (not streamed;
    `max_tokens: 0` scores without generating). Streamed: one event per delta (new tokens
    only), then [DONE]. With `sampling_params.return_routed_experts`, each object and event also has
    `routed_experts` ({"shape", "dtype": "int16", "data": base64}, see `encode_routed_experts`)."""
    s = state(request)
    rid = body.rid or s.new_id("gen")
    job = Job(body.input_ids, body.sampling_params, rid, rid, body.partial)
    if body.stream:
        streams = MergedStreams(s.engine, s, [job])
        await streams.start()
        return StreamingResponse(_events(rid, streams), media_type="text/event-stream")
    (output,) = await unless_client_leaves(request, generate_all(s.engine, s, [job]))
    samples = [_sample(rid, j, sample) for j, sample in enumerate(output.samples)]
    if output.prompt_logprobs is not None:  # with sampling_params.prompt_logprobs, on every object
        for sample in samples:
            sample.update(input_logprobs=_lps(output.prompt_logprobs),
                          input_top_logprobs=_tops(output.prompt_top_logprobs))
    content = samples[0] if len(samples) == 1 else samples
    return Response(json.dumps(content, allow_nan=False), media_type="application/json")  # no jsonable_encoder walk


def _sample(rid: str, index: int, sample: Sample) -> dict:
    return {"rid": rid, "index": index, "output_ids": sample.token_ids, "output_logprobs": _lps(sample.logprobs),
            "output_top_logprobs": _tops(sample.top_logprobs), "weight_versions": sample.token_weight_versions,
            "weight_version": sample.weight_version, "finish_reason": sample.finish_reason,
            "stop_reason": sample.stop_reason, "text": sample.text, **_routes(sample.routed_experts)}


def _routes(rows) -> dict:
    return {} if rows is None else {"routed_experts": encode_routed_experts(rows)}


def _lps(logprobs):
    return None if logprobs is None else [finite(lp) for lp in logprobs]


def _tops(tops):
    return None if tops is None else [{str(t): finite(lp) for t, lp in top.items()} for top in tops]


async def _events(rid: str, streams: MergedStreams):
    try:
        async for _, delta in streams:
            yield sse({"rid": rid, "index": delta.index, "output_ids": delta.token_ids,
                       "output_logprobs": _lps(delta.logprobs), "output_top_logprobs": _tops(delta.top_logprobs),
                       "weight_versions": delta.weight_versions, "finish_reason": delta.finish_reason,
                       "stop_reason": delta.stop_reason, **_routes(delta.routed_experts)})
    except Exception as exc:  # the response has started: the error goes in the stream
        yield sse(error_body(status_of(exc) or 500, " ".join(str(exc).split())))
    yield sse("[DONE]")
