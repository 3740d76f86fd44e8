"""Token-in / token-out generation: `POST /generate` (SGLang's shape: `input_ids`, `sampling_params`, `rid`).

It is the hot path of RL harnesses (hundreds of concurrent clients), so it is served by a plain ASGI handler
ahead of the FastAPI app (`GenerateFastPath`): the framework's routing, dependency and encoding layers cost about
a millisecond per request on the event loop's thread, which the engine thread shares (measured on 2 CPU cores:
256 concurrent one-token requests took 0.38 s through a FastAPI route, 0.10-0.13 s here). Errors are the same
JSON bodies as the app's. The route is therefore not listed in the app's OpenAPI page.

Not streamed, the answer is one object per sample (a list when n > 1) with `output_ids`, `output_logprobs`,
per-token `weight_versions`, `finish_reason`; with `partial`, the output holds the earlier tokens followed by the
new ones. With `sampling_params.prompt_logprobs`, each object also has `input_logprobs` (every input token
after the first) and `input_top_logprobs` (not streamed; `max_tokens: 0` scores without generating).
Streamed, one event per delta (new tokens only), then [DONE]. With
`sampling_params.return_routed_experts`, each object and event also has `routed_experts` ({"shape", "dtype":
"int16", "data": base64}, see `encode_routed_experts`).
"""

from __future__ import annotations

import json

from pydantic import ValidationError

from rollout.outputs import Sample, encode_routed_experts
from rollout.serve.state import ServerState
from rollout.serve.errors import ClientGone, error_body, status_of, validation_message
from rollout.serve.protocol import GenerateRequest
from rollout.serve.streams import Job, MergedStreams, finite, generate_all, sse, unless_client_leaves


def _job(s: ServerState, body: GenerateRequest) -> Job:
    rid = body.rid or s.new_id("gen")
    return Job(body.input_ids, body.sampling_params, rid, rid, body.partial)


async def _complete(s: ServerState, job: Job, receive):
    (output,) = await unless_client_leaves(receive, generate_all(s.engine, s, [job]))
    samples = [_sample(job.rid, j, sample) for j, sample in enumerate(output.samples)]
    if output.prompt_logprobs is not None:  # with sampling_params.prompt_logprobs, on every object
        for sample in samples:
            sample.update(input_logprobs=_lps(output.prompt_logprobs),
                          input_top_logprobs=_tops(output.prompt_top_logprobs))
    return samples[0] if len(samples) == 1 else samples


class GenerateFastPath:
    """ASGI middleware answering `POST /generate` itself; everything else goes on to `app`."""

    def __init__(self, app, server: ServerState):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/generate":
            return await self.app(scope, receive, send)
        if scope["method"] != "POST":
            return await _send_json(send, 405, error_body(405, f"{scope['method']} is not allowed on /generate; "
                                                               f"POST a JSON body"))
        messages, raw = [], b""
        while True:
            message = await receive()
            messages.append(message)
            raw += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        try:
            body = GenerateRequest.model_validate_json(raw)
        except ValidationError as exc:
            return await _send_json(send, 400, error_body(400, *validation_message(exc.errors())))
        job = _job(self.server, body)
        try:
            if body.stream:
                streams = MergedStreams(self.server.engine, self.server, [job])
                await streams.start()  # a request the engine refuses still gets its 4xx
                return await _stream(streams, job.rid, receive, send)
            content = await _complete(self.server, job, receive)
        except ClientGone:
            return await _send_json(send, 499, error_body(499, "the client closed the connection; its requests "
                                                               "were aborted"))
        except Exception as exc:  # noqa: BLE001 - engine errors become their 4xx / 503; others a 500
            status = status_of(exc)
            if status is None:
                raise  # the app's error middleware logs it and answers 500
            return await _send_json(send, status, error_body(status, " ".join(str(exc).split())))
        await _send_json(send, 200, content)


async def _stream(streams: MergedStreams, rid: str, receive, send) -> None:
    """Server-sent events of the request's deltas; a client that leaves ends (and aborts) it."""
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})

    async def pump() -> None:
        async for event in _events(rid, streams):
            await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    try:
        await unless_client_leaves(receive, pump())
    except ClientGone:
        pass  # nobody to tell; the engine requests were aborted
    finally:
        streams.close()


async def _send_json(send, status: int, content) -> None:
    body = json.dumps(content, allow_nan=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


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
