"""`rollout serve`: the engine behind an HTTP server (OpenAI-compatible routes, token-in/token-out `/generate`,
the RL control routes). Needs the `serve` extra (fastapi, uvicorn)."""

from rollout.serve.app import build_app

__all__ = ["build_app"]
