"""The one error shape: ``{"error": {"code", "message"}}`` with the right status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error answer: ``{"error": {"code", "message"}}``."""

    error: ErrorDetail


_MEANING = {
    400: "Malformed input (a cursor, a header, a model or limit this server does not allow)",
    401: "No API key, an unknown one, or a bad read token",
    404: "No such stream for this key",
    409: "The Idempotency-Key was used with another body",
    413: "The body is too large",
    422: "The body is not a valid request",
    429: "Over a limit; retry after `Retry-After` seconds",
    503: "Not ready, or a backing store is unreachable; retry after `Retry-After` seconds",
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route's error statuses, all in the one error shape."""
    return {status: {"model": ErrorBody, "description": _MEANING[status]} for status in statuses}


class ApiError(Exception):
    """An error the client can act on; ``message`` says what to do."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
        problems.append(f"{where}: {err['msg']}")
    return error_response(422, "invalid_request", "; ".join(problems))


async def on_redis_error(request: Request, exc: Exception) -> JSONResponse:
    # Where Redis lives is the operator's business: the log says it, the client hears "retry".
    log.warning("%s %s: Redis is unreachable: %s", request.method, request.url.path, exc)
    return error_response(
        503, "unavailable", "a backing store is unreachable; retry shortly", {"Retry-After": "1"}
    )


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}


async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "error")
    return error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))
