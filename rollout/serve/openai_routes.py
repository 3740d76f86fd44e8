"""OpenAI-compatible routes: `/v1/models`, `/v1/completions`."""

from __future__ import annotations

from fastapi import APIRouter, Request

from rollout.serve.app import state

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request):
    """The one model served."""
    s = state(request)
    return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": s.created,
                                        "owned_by": "rollout-engine"}]}
