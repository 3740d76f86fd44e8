"""Token-in / token-out generation: `POST /generate`."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
