"""What OpenAI's surfaces (``chat``, ``responses``) share: OpenAI's error shape and the route class
that answers in it, the sampling options they pass upstream, ids and times, and how a rendering ends
a stream early.

Errors: the native API answers ``{"error": {"code", "message"}}``; an openai SDK also reads ``type``
and ``param``, and picks its exception class by status (``AuthenticationError`` for 401,
``NotFoundError`` 404, ``RateLimitError`` 429, ``BadRequestError`` 400). :class:`OpenAIRoute` turns
whatever a route or a shared dependency raises (:class:`ApiError`, a validation error, an
unreachable Redis) into that shape, with tailgate's ``code`` kept, so the one set of dependencies
serves both shapes. As OpenAI answers them: a body that does not validate is a 400
``invalid_request_error``, not FastAPI's 422, and a model outside ``TAILGATE_MODELS`` is a 404
``model_not_found``, not the native API's 400 ``model_not_allowed``.

Deliberate oddity: :func:`until_finished` relies on ``sse.respond`` rendering each item before it
asks for the next, so a renderer's ``finished`` is current when the generator resumes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence
from contextlib import aclosing
from typing import Annotated, Any, Protocol

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway import sse
from gateway.creation import StreamRequest
from gateway.errors import ApiError
from gateway.hub import Tailed
from gateway.services import Services
from tailgate.events import START, Entry

log = logging.getLogger(__name__)

# OpenAI's `type` by status; the SDK does not look at it, people reading the body do.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
_MEANING = {
    400: "Invalid request (OpenAI answers a body that does not validate with 400, and so does this)",
    401: "No API key, or an unknown one",
    404: "No such model here (`model_not_found`, as OpenAI answers it), or no such response for this key",
    409: "The Idempotency-Key was used with another body, or the generation was cancelled",
    413: "The body is too large",
    429: "Over a limit; retry after `Retry-After` seconds",
    500: "The generation failed (`stream: false`): the upstream's error, by its code",
    502: "The upstream failed the generation (`stream: false`)",
    503: "Not ready, or a backing store is unreachable; retry after `Retry-After` seconds",
}


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None
    param: str | None


class OpenAIErrorBody(BaseModel):
    """An error as OpenAI answers it: ``{"error": {"message", "type", "code", "param"}}``."""

    error: OpenAIErrorDetail


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route's error statuses, in OpenAI's error shape."""
    return {status: {"model": OpenAIErrorBody, "description": _MEANING[status]} for status in statuses}


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error")


def error_body(status: int, code: str | None, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "code": code, "param": param}}


def error_response(
    status: int,
    code: str | None,
    message: str,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, param), status_code=status, headers=headers)


def validation_error(exc: RequestValidationError) -> JSONResponse:
    """A body or parameter that does not validate, as OpenAI words it: 400 with the first bad field
    as ``param``; an argument OpenAI does not know either is "Unrecognized request argument"."""
    errors = exc.errors()
    where = [".".join(str(p) for p in err["loc"] if p not in ("body", "query", "header")) for err in errors]
    extra = [w for err, w in zip(errors, where, strict=True) if err["type"] == "extra_forbidden"]
    if extra:
        message = f"Unrecognized request argument supplied: {', '.join(extra)}"
        return error_response(400, "unknown_parameter", message, param=extra[0])
    problems = "; ".join(f"{w or 'body'}: {err['msg']}" for err, w in zip(errors, where, strict=True))
    return error_response(400, "invalid_request", problems, param=where[0] if where else None)


class OpenAIRoute(APIRoute):
    """A route whose errors, its dependencies' included, answer in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as exc:
                if exc.code == "model_not_allowed":  # OpenAI: an unknown model is not found
                    return error_response(404, "model_not_found", exc.message, exc.headers, "model")
                return error_response(exc.status, exc.code, exc.message, exc.headers)
            except RequestValidationError as exc:
                return validation_error(exc)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                log.warning("%s %s: Redis is unreachable: %s", request.method, request.url.path, exc)
                message = "a backing store is unreachable; retry shortly"
                return error_response(503, "unavailable", message, {"Retry-After": "1"})

        return route


SAMPLING = ("top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "user")


class Sampling(BaseModel):
    """Sampling options an OpenAI client may send, passed on to the model as they are."""

    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = Field(default=None, max_length=256)


class OpenAIRequest(StreamRequest, Sampling):
    """A :class:`StreamRequest` with the sampling options OpenAI's surfaces pass on to the model."""

    def upstream_request(self, default_model: str) -> dict[str, Any]:
        out = super().upstream_request(default_model)
        out.update({k: getattr(self, k) for k in SAMPLING if getattr(self, k) is not None})
        return out


def seconds(ms: str | None) -> int:
    """A meta timestamp (Unix ms) as OpenAI's ``created``: whole Unix seconds."""
    return int(float(ms) / 1000) if ms else 0


def entry_seconds(entry: Entry) -> int:
    """When an event was stored, from its id (Unix ms first): the same on every replica and re-read."""
    return int(entry.id.partition("-")[0]) // 1000


# What a terminal error event's code means for OpenAI's `type`.
_ERROR_TYPES = {"upstream_rate_limited": "rate_limit_error", "upstream_bad_request": "invalid_request_error"}


def stream_error(code: str, message: str) -> dict[str, Any]:
    """The error inside a stream (OpenAI's ``{"error": {...}}``): the SDK raises ``APIError`` on it."""
    kind = _ERROR_TYPES.get(code, "server_error")
    return {"message": message, "type": kind, "code": code, "param": None}


def reset_message(stream_id: str) -> str:
    return (
        "the worker generating this answer was lost after it had sent text, and the model started "
        "over: the text so far is void, and this format cannot take it back. The new attempt streams "
        f"at /v1/streams/{stream_id}/events"
    )


class Renderer(Protocol):
    """A stateful wire format: renders stored events in order, and knows when its stream is over."""

    @property
    def finished(self) -> bool: ...

    def __call__(self, entries: Sequence[Entry]) -> bytes: ...


async def until_finished(
    events: AsyncGenerator[Tailed, None], render: Renderer
) -> AsyncGenerator[Tailed, None]:
    """``events`` until ``render`` has written its format's last frame, which may come before the
    stream's own terminal event (a ``reset`` these formats cannot express ends them)."""
    async with aclosing(events):
        async for item in events:
            yield item
            if render.finished:
                return


def sdk_stream(
    svc: Services, stream_id: str, render: Renderer, release: Callable[[], None]
) -> sse.SSEResponse:
    """A stream rendered for an SDK, to ``render``'s last frame. Not resumable by the hub: an SDK
    does not reconnect, so a gateway shutting down lets it finish."""
    tail = svc.hub.tail(stream_id, START, 0, resumable=False)
    return sse.respond(
        until_finished(tail, render),
        sse.Wire(render, keep_alive=sse.KEEP_ALIVE),
        stream_id=stream_id,
        send_timeout=svc.settings.send_timeout_s,
        on_close=release,
    )
