"""The RL control routes: abort, pause / resume, weights, sleep / wake."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
