"""The HTTP app: `build_app(engine)` serves one `AsyncRolloutEngine` (OpenAI routes, token-in/token-out
`/generate`, the RL control routes)."""

from __future__ import annotations

import hmac
import json
from typing import Optional

from fastapi import FastAPI

from rollout.serve.chat_route import router as chat_router
from rollout.serve.control_routes import router as control_router
from rollout.serve.errors import error_body, install_error_handlers
from rollout.serve.generate_route import GenerateFastPath
from rollout.serve.metrics import router as metrics_router
from rollout.serve.openai_routes import router as openai_router
from rollout.serve.state import ServerState

VERSION = "0.1.0"
DEFAULT_MAX_BODY_BYTES = 32 * 2**20


def build_app(engine, model_name: str = "rollout", *, api_key: Optional[str] = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """A FastAPI app serving `engine` (an `AsyncRolloutEngine`) under the name `model_name`.

    With `api_key`, every route needs `Authorization: Bearer <api_key>` (401 otherwise). Bodies over
    `max_body_bytes` get a 413. Errors are JSON bodies `{"error": {"message", "type", "param", "code"}}`.
    The app does not shut the engine down; `rollout.serve.server.serve` does, on SIGINT / SIGTERM.
    """
    app = FastAPI(title="rollout-engine", version=VERSION)
    app.state.server = ServerState(engine, model_name)
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(chat_router)
    app.include_router(control_router)
    app.include_router(metrics_router)

    @app.get("/health")
    async def health():
        """200 while the server serves."""
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": VERSION}

    app.add_middleware(GenerateFastPath, server=app.state.server)  # POST /generate; runs after Guard (added last)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


class Guard:
    """ASGI middleware: the API key check and the body size bound, before any route sees the request."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            return await _reply(send, 401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                {"www-authenticate": "Bearer"})
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return await _reply(send, 400, f"Content-Length must be a number of bytes, got {length[:20]!r}")
        if int(length) > self.max_body_bytes:
            return await _reply(send, 413, f"the body ({int(length)} bytes) is over the limit of "
                                           f"{self.max_body_bytes} bytes")
        messages, size = [], 0
        while True:  # read the whole body first (bounded), so a chunked body over the limit is refused too
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return await _reply(send, 413, f"the body is over the limit of {self.max_body_bytes} bytes")
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


async def _reply(send, status: int, message: str, headers: Optional[dict] = None) -> None:
    body = json.dumps(error_body(status, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
