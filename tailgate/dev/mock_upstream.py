"""An OpenAI-compatible ``/v1/chat/completions`` for development, tests and benchmarks.

The answer is a deterministic function of the request's ``model`` and ``messages``: N tokens drawn
from a fixed vocabulary (with some multi-byte text) by a hash of the request, the first after
``ttft_ms``, then one every ``delay_ms``. ``max_tokens`` below N cuts it with ``finish_reason:
"length"``. Non-streaming answers the same text at once, so a test can learn the expected output by
asking the mock directly with the real SDK.

Per-request behaviour is chosen by directives in the last message, ``[mock:key=value,key=value]``:

    tokens=N  delay_ms=D  ttft_ms=T   override the server's defaults
    status=CODE                       answer CODE with an OpenAI error body (401, 429, 500, ...)
    times=K                           with status: fail only the first K identical requests
    fail_after=K                      K tokens, then an error frame inside the stream
    drop_after=K                      K tokens, then the TCP connection is cut
    stall_after=K                     K tokens, then silence until the client goes away
    stamp=1                           each token ends with `@<send time in ns>` (benchmarks)
    split=1                           lines end in CRLF, and each frame goes out in 5-byte writes
    echo=1                            the answer is the message itself (without the directive), a
                                      token per line or space: to test that model output is escaped

``GET /mock/requests`` lists what was served: tokens sent and whether the client closed early.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

VOCABULARY = (
    "the a stream of tokens flows through tailgate to every reader and resumes after each drop "
    "while workers keep writing into redis so nothing is lost when networks fail café naïve "
    "日本語 données ✓ 🚀 über façade résumé fast exact ordered durable chunk event cursor"
).split()

_DIRECTIVE = re.compile(r"\[mock:([^\]]*)\]")
_ERROR_TYPES = {
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    400: "invalid_request_error",
}


@dataclass
class Served:
    id: str
    prompt: str
    stream: bool
    status: int
    tokens_planned: int
    tokens_sent: int = 0
    completed: bool = False
    closed_early: bool = False
    # The mock's monotonic clock when the streamed body began and ended: tests compute how many
    # streams the upstream served at once.
    opened_at: float | None = None
    closed_at: float | None = None


@dataclass(frozen=True)
class MockConfig:
    tokens: int = 32
    delay_ms: float = 20.0
    ttft_ms: float = 200.0
    api_key: str | None = None


def directives(messages: list[dict[str, Any]]) -> dict[str, int]:
    content = messages[-1].get("content", "") if messages else ""
    if not isinstance(content, str):
        content = json.dumps(content)
    out: dict[str, int] = {}
    for group in _DIRECTIVE.findall(content):
        for pair in group.split(","):
            key, _, value = pair.partition("=")
            if key.strip() and value.strip().isdigit():
                out[key.strip()] = int(value)
    return out


def tokens_for(model: str, messages: list[dict[str, Any]], n: int) -> list[str]:
    """The deterministic answer: ``n`` tokens for this model and conversation."""
    seed = hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode()).digest()
    out = []
    for i in range(n):
        block = hashlib.sha256(seed + i.to_bytes(4, "big")).digest()
        word = VOCABULARY[int.from_bytes(block[:4], "big") % len(VOCABULARY)]
        out.append(word if i == 0 else " " + word)
    return out


def echo(messages: list[dict[str, Any]]) -> list[str]:
    """The last message without its directives, cut after each space or newline."""
    text = _DIRECTIVE.sub("", str(messages[-1].get("content", "")))
    return re.findall(r"[^ \n]*[ \n]?", text)[:-1] or [""]


def create_app(config: MockConfig) -> Starlette:
    mock = Mock(config)
    return Starlette(
        routes=[
            Route("/v1/chat/completions", mock.completions, methods=["POST"]),
            Route("/v1/models", mock.models),
            Route("/mock/requests", mock.requests_served),
        ]
    )


def error(status: int, message: str, code: str | None = None) -> JSONResponse:
    """An error in OpenAI's shape (the SDK raises the matching class)."""
    kind = _ERROR_TYPES.get(status, "server_error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    headers = {"retry-after-ms": "10"} if status in (429, 500, 502, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass
class Answer:
    """One request's answer, decided before the first byte."""

    record: Served
    model: str
    words: list[str]
    finish: str
    usage: dict[str, int]
    opts: dict[str, int]
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def chunk(self, delta: dict[str, Any], reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return self._frame({"choices": [choice]})

    def usage_chunk(self) -> bytes:
        return self._frame({"choices": [], "usage": self.usage})

    def _frame(self, fields: dict[str, Any]) -> bytes:
        frame = {
            "id": self.record.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            **fields,
        }
        return b"data: " + json.dumps(frame, ensure_ascii=False).encode() + b"\n\n"

    def whole(self) -> JSONResponse:
        self.record.tokens_sent, self.record.completed = len(self.words), True
        message = {"role": "assistant", "content": "".join(self.words)}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish}
        return JSONResponse(
            {
                "id": self.record.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [choice],
                "usage": self.usage,
                "system_fingerprint": None,
            }
        )


class Mock:
    """The server's state: its configuration, what it served, and the failures it counted."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.served: deque[Served] = deque(maxlen=10_000)
        self.failures: Counter[str] = Counter()

    async def completions(self, request: Request) -> Response:
        try:
            body = await request.json()
            model, messages = body["model"], body["messages"]
        except (ValueError, KeyError, TypeError):
            return error(400, "model and messages are required", "invalid_request")
        answer = self._answer(body, model, messages)
        self.served.append(answer.record)
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or (self.config.api_key and auth[7:] != self.config.api_key):
            answer.record.status = 401
            return error(401, "Incorrect API key provided.", "invalid_api_key")
        status = answer.opts.get("status")
        if status:
            key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
            self.failures[key] += 1
            if "times" not in answer.opts or self.failures[key] <= answer.opts["times"]:
                answer.record.status = status
                return error(status, f"mock failure {status} as requested", "mock_failure")
        if not answer.record.stream:
            return answer.whole()
        frames = self._frames(answer)
        if answer.opts.get("split"):
            frames = _split(frames)
        return StreamingResponse(frames, media_type="text/event-stream")

    def _answer(self, body: dict[str, Any], model: str, messages: list[dict[str, Any]]) -> Answer:
        opts = directives(messages)
        n = opts.get("tokens", self.config.tokens)
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        finish = "length" if max_tokens is not None and max_tokens < n else "stop"
        if max_tokens is not None:
            n = min(n, max_tokens)
        words = echo(messages) if opts.get("echo") else tokens_for(model, messages, n)
        prompt = str(messages[-1].get("content", "")) if messages else ""
        record = Served(
            f"chatcmpl-{secrets.token_hex(12)}", prompt, bool(body.get("stream")), 200, len(words)
        )
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return Answer(record, model, words, finish, usage, opts, include_usage)

    async def _frames(self, answer: Answer) -> AsyncIterator[bytes]:
        """The streamed answer, with the faults its directives ask for."""
        record, opts = answer.record, answer.opts
        ttft = opts.get("ttft_ms", self.config.ttft_ms) / 1000
        delay = opts.get("delay_ms", self.config.delay_ms) / 1000
        record.opened_at = time.monotonic()
        try:
            yield answer.chunk({"role": "assistant", "content": ""})
            start = time.monotonic() + ttft
            for i, word in enumerate(answer.words):
                if i == opts.get("fail_after"):
                    err = {"message": "mock failure mid-stream", "type": "server_error", "param": None}
                    yield b"data: " + json.dumps({"error": err | {"code": "mock_failure"}}).encode() + b"\n\n"
                    return
                if i == opts.get("drop_after"):
                    raise ConnectionAbortedError("mock drop as requested")
                if i == opts.get("stall_after"):
                    await asyncio.Event().wait()
                pause = start + i * delay - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                yield answer.chunk({"content": f"{word}@{time.time_ns()}" if opts.get("stamp") else word})
                record.tokens_sent = i + 1
            yield answer.chunk({}, answer.finish)
            if answer.include_usage:
                yield answer.usage_chunk()
            yield b"data: [DONE]\n\n"
            record.completed = True
        finally:
            record.closed_at = time.monotonic()
            record.closed_early = not record.completed and "fail_after" not in opts

    async def models(self, _: Request) -> JSONResponse:
        return JSONResponse(
            {"object": "list", "data": [{"id": "mock", "object": "model", "owned_by": "tailgate"}]}
        )

    async def requests_served(self, _: Request) -> JSONResponse:
        return JSONResponse([asdict(r) for r in self.served])


async def _split(frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Frames with CRLF line ends, each in 5-byte writes a millisecond apart: a reader gets lines
    (and CRLFs) cut across reads."""
    async for frame in frames:
        frame = frame.replace(b"\n", b"\r\n")
        for i in range(0, len(frame), 5):
            yield frame[i : i + 5]
            await asyncio.sleep(0.001)
