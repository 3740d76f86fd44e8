"""Run the app on uvicorn; SIGINT / SIGTERM end the streams in flight with a final event, then free the engine."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Optional

import uvicorn

from rollout.serve.app import DEFAULT_MAX_BODY_BYTES, build_app


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class EngineServer(uvicorn.Server):
    """A uvicorn server that shuts its engine down first when it stops: every request in flight ends with
    finish_reason "abort" (streams get their final event and [DONE]), then the connections close."""

    def __init__(self, config: uvicorn.Config, engine):
        super().__init__(config)
        self.engine = engine
        self.engine_closed = False

    def app_state(self):
        """The app's `ServerState` (engine, request ids in flight)."""
        return self.config.app.state.server

    async def shutdown(self, sockets=None) -> None:
        await self.close_engine()
        await super().shutdown(sockets)
        # uvicorn re-raises the signal that stopped it once it has stopped; the shutdown was clean, so exit 0
        getattr(self, "_captured_signals", []).clear()

    async def close_engine(self) -> None:
        if not self.engine_closed:
            self.engine_closed = True
            await self.engine.shutdown()


def make_server(engine, host: str = "127.0.0.1", port: int = 8000, *, model_name: str = "rollout",
                api_key: Optional[str] = None, allow_unauthenticated: bool = False,
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, log_level: str = "info") -> EngineServer:
    """The server for `engine` on host:port (not started: `server.run()` or `await server.serve()`).

    Refuses (ValueError) to bind a non-loopback address without `api_key` unless `allow_unauthenticated`.
    """
    if api_key is not None and not api_key:
        raise ValueError("--api-key must not be empty")
    if api_key is None and not is_loopback(host) and not allow_unauthenticated:
        raise ValueError(f"refusing to serve on {host} (not a loopback address) without --api-key; give a key, "
                         f"or --allow-unauthenticated to serve anyone who can reach the port")
    app = build_app(engine, model_name, api_key=api_key, max_body_bytes=max_body_bytes)
    # Keep idle connections 60 s (uvicorn's 5 s races with clients' pooled connections: a request sent as the
    # server closes its idle connection is lost with a ReadError; RL harnesses keep pools of hundreds)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=30, timeout_keep_alive=60)
    return EngineServer(config, engine)


def run_serve(engine_config: dict, host: str, port: int, **server_options) -> None:
    """`rollout serve`: build the engine (`AsyncRolloutEngine(**engine_config)`), serve it until SIGINT / SIGTERM,
    then shut it down."""
    from rollout.async_engine import AsyncRolloutEngine
    from rollout.config import EngineConfig

    config = EngineConfig(**engine_config)  # a bad option fails here, before the model loads
    engine = AsyncRolloutEngine(config)
    server = make_server(engine, host, port, **server_options)
    try:
        server.run()
    finally:
        if not server.engine_closed:  # it never started (e.g. the port was taken)
            asyncio.run(server.close_engine())
