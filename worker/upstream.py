"""The model, through the openai SDK: one ``AsyncOpenAI`` per worker process, streaming on.

The SDK makes the request (auth, base URL, retries with backoff before the first byte, error types),
over its aiohttp transport (``openai[aiohttp]``, a quarter less CPU per token than the default);
the body's SSE lines are read raw and decoded with ``orjson.loads``. The SDK's own stream builds a
pydantic model per chunk, which costs more CPU than everything else a worker does for a token.
The request goes through the client's ``post`` (the SDK's documented way to an endpoint as is,
here with ``httpx.Response`` as the result type and ``stream=True``): ``chat.completions.create``
first walks its ~45 typed parameters and every message through the SDK's type-directed transform,
which was a sixth of a worker's CPU at 200 new streams a second. The body is the request the gateway
validated, sent as is.

Every way a call can fail becomes an :class:`UpstreamError` whose ``code`` is what the client sees in
the ``error`` event:

    upstream_auth          401/403: the worker's key is wrong; retrying cannot help
    upstream_rate_limited  429 after the SDK's retries
    upstream_bad_request   400/404/422: the upstream refused this request
    upstream_error         5xx after the SDK's retries, or an error frame inside the stream
    upstream_unreachable   connection refused or dropped
    upstream_timeout       no byte for ``upstream_idle_timeout_s``
    upstream_incomplete    the stream ended without a finish reason
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx2
import openai
import orjson

from tailgate.settings import Settings

# Every code an UpstreamError may carry (the table above).
CODES = (
    "upstream_auth",
    "upstream_rate_limited",
    "upstream_bad_request",
    "upstream_error",
    "upstream_unreachable",
    "upstream_timeout",
    "upstream_incomplete",
)


class UpstreamError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(slots=True)
class Result:
    finish_reason: str
    usage: dict[str, Any] | None


def client(settings: Settings) -> openai.AsyncOpenAI:
    """Reads ``OPENAI_API_KEY`` and ``OPENAI_BASE_URL`` from the environment, as the SDK does."""
    timeout = openai.Timeout(
        connect=settings.upstream_connect_timeout_s,
        read=settings.upstream_idle_timeout_s,
        write=settings.upstream_connect_timeout_s,
        pool=settings.upstream_connect_timeout_s,
    )
    return openai.AsyncOpenAI(
        max_retries=settings.upstream_max_retries,
        timeout=timeout,
        # One connection per running stream: the SDK's default pool (1,000) would cap a worker
        # below TAILGATE_CONCURRENCY when that is set higher.
        http_client=openai.DefaultAioHttpClient(
            timeout=timeout,
            limits=httpx2.Limits(
                max_connections=max(settings.concurrency, 100),
                max_keepalive_connections=max(settings.concurrency, 100),
            ),
        ),
    )


async def stream(api: openai.AsyncOpenAI, request: dict[str, Any], on_text: Callable[[str], None]) -> Result:
    """Streams one completion, calling ``on_text`` for every non-empty delta.

    Cancelling the calling task closes the HTTP response, so the upstream stops generating (and billing).
    """
    finish: str | None = None
    usage: dict[str, Any] | None = None
    body = request | {"stream": True, "stream_options": {"include_usage": True}}
    try:
        response = await api.post(  # the raw response (cast_to), its body not read yet (stream)
            "/chat/completions",
            cast_to=httpx2.Response,
            body=body,
            stream=True,
            stream_cls=openai.AsyncStream[Any],
        )
        assert isinstance(response, httpx2.Response)
        async with contextlib.aclosing(response):
            async for line in _lines(response):
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, `event:` lines
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = orjson.loads(data)
                if chunk.get("error"):
                    error = chunk["error"]
                    message = error.get("message") if isinstance(error, dict) else str(error)
                    raise UpstreamError("upstream_error", f"the upstream failed mid-stream: {message}")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or ():
                    if choice.get("index", 0) != 0:
                        continue
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        on_text(text)
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
    except openai.APIError as exc:
        raise classify(exc) from exc
    except httpx2.TransportError as exc:  # while reading the body, which the SDK does not wrap
        raise classify(exc) from exc
    except ValueError as exc:  # orjson.JSONDecodeError is one
        raise UpstreamError("upstream_error", f"the upstream sent a malformed chunk: {exc}") from exc
    if finish is None:
        raise UpstreamError("upstream_incomplete", "the upstream ended the stream without a finish reason")
    return Result(finish, usage)


async def _lines(response: httpx2.Response) -> AsyncIterator[bytes]:
    """The body's lines, as bytes (``\n``, ``\r\n`` or ``\r`` ends a line, as SSE says). Bytes
    go to ``orjson.loads`` as they are: no text decoding and line splitting layered per chunk. (A
    ``\r\n`` split across two chunks reads as a line and an empty line, which ends nothing here.)"""
    rest = b""
    async for chunk in response.aiter_bytes():
        lines = (rest + chunk).splitlines(keepends=True)
        rest = lines.pop() if lines and not lines[-1].endswith((b"\n", b"\r")) else b""
        for line in lines:
            yield line.rstrip(b"\r\n")
    if rest:
        yield rest


def classify(exc: openai.APIError | httpx2.TransportError) -> UpstreamError:
    # By what happened, not by the wrapper's type: the aiohttp transport reports a refused
    # connection as a connect *timeout*.
    refused = _cause(exc, ConnectionError)
    if refused is not None:
        return UpstreamError("upstream_unreachable", f"cannot reach the upstream: {refused}")
    if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException):
        return UpstreamError("upstream_timeout", "the upstream sent nothing within the idle timeout")
    if isinstance(exc, openai.APIConnectionError | httpx2.TransportError):
        cause = exc.__cause__ or exc
        return UpstreamError("upstream_unreachable", f"cannot reach the upstream: {cause}")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        detail = f"upstream answered {status}: {exc.message}"
        if status in (401, 403):
            return UpstreamError("upstream_auth", detail)
        if status == 429:
            return UpstreamError("upstream_rate_limited", detail)
        if 400 <= status < 500:
            return UpstreamError("upstream_bad_request", detail)
        return UpstreamError("upstream_error", detail)
    return UpstreamError("upstream_error", f"the upstream failed mid-stream: {exc.message}")


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
