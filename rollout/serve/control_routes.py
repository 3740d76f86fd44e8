"""The RL control routes: abort, pause / resume, weight loads and updates, sleep / wake, the weight version."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from pydantic import BaseModel, ValidationError

from rollout.serve.state import state
from rollout.serve.errors import APIError, validation_message
from rollout.serve.protocol import (AbortRequest, InitWeightTransferRequest, LoadWeightsRequest, PauseRequest,
                                    SleepRequest, UpdateWeightsRequest, WakeUpRequest)
from weight_sync import TransferInitInfo, UpdateInfo
from worker.loader import checkpoint_files, iter_checkpoint

router = APIRouter()


@router.post("/abort_request")
async def abort_request(body: AbortRequest, request: Request):
    """End request `rid` (every prompt of it) or all requests in flight; they end with finish_reason "abort" and
    what they produced so far. Returns the engine request ids aborted ([] when none was in flight)."""
    s = state(request)
    ids = [rid for rid, group in list(s.in_flight.items()) if body.abort_all or group == body.rid]
    found = await asyncio.gather(*[s.engine.abort(rid) for rid in ids])
    return {"aborted": [rid for rid, ok in zip(ids, found) if ok]}


@router.post("/pause_generation")
async def pause_generation(body: PauseRequest, request: Request):
    """Stop generating: "abort" ends the requests in flight, "wait" lets them finish, "keep" keeps them for
    /resume_generation. Requests arriving while paused wait."""
    await state(request).engine.pause_generation(body.mode)
    return {"paused": True, "mode": body.mode}


@router.post("/resume_generation")
async def resume_generation(request: Request):
    await state(request).engine.resume_generation()
    return {"paused": False}


@router.post("/sleep")
async def sleep(body: SleepRequest, request: Request):
    """Release the device memory (level 1: weights kept in host memory; level 2: weights dropped)."""
    s = state(request)
    await s.engine.sleep(body.level)
    s.asleep = {"weights", "kv_cache"}
    return {"sleeping": True, "level": body.level}


@router.post("/wake_up")
async def wake_up(body: WakeUpRequest, request: Request):
    s = state(request)
    await s.engine.wake_up(body.tags)
    s.asleep -= set(body.tags or ("weights", "kv_cache"))
    return {"tags": body.tags}


@router.post("/init_weight_transfer")
async def init_weight_transfer(body: InitWeightTransferRequest, request: Request):
    """Join the trainer's weight-transfer group (`TransferInitInfo` fields, the secret in plain text)."""
    init_info = _parse(TransferInitInfo, body.init_info, "init_info")
    engine = state(request).engine
    if body.worker_index is None:  # the Ray engine's call takes no worker_index (its workers join together)
        await engine.init_weight_transfer(init_info)
    else:
        await engine.init_weight_transfer(init_info, body.worker_index)
    return {"joined": True}


@router.post("/update_weights")
async def update_weights(body: UpdateWeightsRequest, request: Request):
    """The trainer's next update over the transfer group (`update_info`: `UpdateInfo` fields), or the weights of
    the checkpoint directory `path`; lands between two steps as `pause_mode` says."""
    engine = state(request).engine
    if body.path is not None:
        version = await _load(engine, body.path, body.version, body.pause_mode)
    else:
        info = None if body.update_info is None else _parse(UpdateInfo, body.update_info, "update_info")
        version = await engine.update_weights(info, body.pause_mode)
    return {"weight_version": version}


@router.post("/load_weights_from_disk")
async def load_weights_from_disk(body: LoadWeightsRequest, request: Request):
    """The weights of the checkpoint directory `path` (safetensors only: nothing is unpickled)."""
    return {"weight_version": await _load(state(request).engine, body.path, body.version, body.pause_mode)}


async def _load(engine, path: str, version, pause_mode) -> int:
    files = await asyncio.to_thread(checkpoint_files, path)
    return await engine.load_weights(iter_checkpoint(files), version, pause_mode)


def _parse(model: type[BaseModel], value: dict, field: str):
    """`value` as `model`, or a 400 naming `field`'s bad entries."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        message, first = validation_message(exc.errors())
        raise APIError(400, f"{field}: {message}", f"{field}.{first}" if first else field) from None


@router.get("/weight_version")
async def weight_version(request: Request):
    return {"weight_version": state(request).engine.weight_version}
