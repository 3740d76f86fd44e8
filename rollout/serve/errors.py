"""JSON error bodies (the OpenAI shape) for every failure a request can meet: never an HTML page, never a 500 for
bad input."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rollout.errors import EngineClosedError, EnginePausedError, InvalidRequestError, ReplicaError
from weight_sync import WeightTransferError, WeightUpdateRejected
from worker.errors import CheckpointError, EngineSleepingError, UnsupportedArchitectureError, WeightsInvalidError

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
               503: "service_unavailable_error"}
# engine exception -> HTTP status
STATUS = (
    (InvalidRequestError, 400), (CheckpointError, 400), (UnsupportedArchitectureError, 400), (ValidationError, 400),
    (WeightsInvalidError, 400), (WeightUpdateRejected, 409), (WeightTransferError, 409),
    (EnginePausedError, 503), (EngineSleepingError, 503), (EngineClosedError, 503), (ReplicaError, 503),
)


class APIError(Exception):
    """An HTTP error with a message saying what was wrong and what is allowed; `param` names the field."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class ClientGone(Exception):
    """The client disconnected before its (not streamed) response was ready; its requests were aborted."""


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": status}}


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of an engine exception, or None for an unexpected one (a 500)."""
    return next((status for kind, status in STATUS if isinstance(exc, kind)), None)


def validation_message(errors) -> tuple[str, str | None]:
    """(one-line message, first field) from pydantic / FastAPI errors: 'field: what is wrong; ...'."""
    parts, first = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx", {}).get("error", "")
            parts.append(f"the body is not valid JSON ({ctx})" if ctx else "the body is not valid JSON")
            continue
        field = ".".join(loc) or "body"
        first = first or field
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field (not allowed here)"
        parts.append(f"{field}: {msg}")
    return "; ".join(parts) or "invalid request", first


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can raise becomes a JSON body with the right 4xx / 5xx status."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(400, *validation_message(exc.errors()))

    @app.exception_handler(ValidationError)
    async def _pydantic(request: Request, exc: ValidationError):
        return error_response(400, *validation_message(exc.errors()))

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see GET /docs for the routes"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        return error_response(499, "the client closed the connection; its requests were aborted")

    for kind, status in STATUS:
        if kind is not ValidationError:
            app.add_exception_handler(kind, _engine_handler(status))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


def _engine_handler(status: int):
    async def handler(request: Request, exc: Exception):
        return error_response(status, " ".join(str(exc).split()))
    return handler
