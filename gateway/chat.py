"""``POST /v1/chat/completions``: OpenAI's Chat Completions, served from a queued stream.

The generation is queued like any stream (``creation.start``), so a client that drops does not stop
it, a worker that dies is taken over, and the whole answer stays readable at
``/v1/streams/{id}/events`` (the id is in ``X-Tailgate-Stream-Id``). ``stream: true`` answers
OpenAI's chunks, each frame with the stream's cursor as its ``id``; ``stream: false`` waits for the
end and answers a ``chat.completion``.

A ``reset`` (a worker was lost and the model starts over) cannot be said in this format. Before the
first delta it is left out; after one, the stream ends with an error frame, which the openai SDKs
raise as ``APIError``: two attempts are never spliced into one text. The rendering is a function
of the stored events alone, so a re-read (``Idempotency-Key``, ``Last-Event-ID``) gets the same
frames. ``stream: false`` delivers nothing before the end, so there every reset is invisible.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import aclosing
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from gateway.creation import ChatMessage, MetadataKey, MetadataValue, start
from gateway.dependencies import Caller
from gateway.errors import ApiError
from gateway.hub import Batch
from gateway.openai_wire import (
    SAMPLING,
    OpenAIRequest,
    OpenAIRoute,
    Sampling,
    documented,
    error_response,
    reset_message,
    sdk_stream,
    seconds,
    stream_error,
)
from gateway.services import Services, Svc
from tailgate.events import START, CursorError, Entry, dumps, id_key, parse_cursor

router = APIRouter(tags=["openai"], route_class=OpenAIRoute)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(Sampling):
    """OpenAI's Chat Completions request, the text-only part of it."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    metadata: dict[MetadataKey, MetadataValue] | None = Field(default=None, max_length=16)
    n: Literal[1] | None = Field(default=None, description="One choice: tailgate streams one answer.")
    store: bool | None = Field(default=None, description="Accepted; every stream is kept for its retention.")
    logprobs: Literal[False] | None = None

    def stream_request(self) -> OpenAIRequest:
        return OpenAIRequest(
            messages=self.messages,
            model=self.model,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            metadata=self.metadata,
            **{k: getattr(self, k) for k in SAMPLING},
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None
    annotations: list[Any] = []


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    """A whole answer (``stream: false``), as OpenAI's ``chat.completion``."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: dict[str, Any] | None
    system_fingerprint: None = None


RESUME_DOC = "With `stream: true` and the `Idempotency-Key` that started it: resume after this frame's `id`."


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={
        200: {
            "model": ChatCompletion,
            "description": "`stream: false`: the answer; `stream: true`: OpenAI's chunks, `data: [DONE]`",
            "content": {"text/event-stream": {}},
        },
        **documented(400, 401, 404, 409, 413, 429, 500, 502, 503),
    },
)
async def chat_completions(
    svc: Svc,
    owner: Caller,
    body: ChatRequest,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    last_event_id: Annotated[str | None, Header(description=RESUME_DOC)] = None,
) -> Response:
    """OpenAI's Chat Completions: a queued generation, read as chunks or waited for whole."""
    if idempotency_key is not None and not idempotency_key.strip():
        raise ApiError(400, "bad_idempotency_key", "the Idempotency-Key header is empty; send a key or none")
    cursor = _cursor(body, idempotency_key, last_event_id)
    if not body.stream:
        created = await start(svc, owner, body.stream_request(), idempotency_key)
        return await _whole(svc, created.id)
    release = svc.readers.take(owner)  # before the stream exists: a refusal leaves nothing behind
    try:
        created = await start(svc, owner, body.stream_request(), idempotency_key)
        meta = await svc.store.meta(created.id)
        if cursor is not None and await svc.store.at(created.id, cursor) is None:
            raise ApiError(400, "bad_cursor", f"Last-Event-ID {cursor!r} is not an event of this stream")
    except BaseException:
        release()
        raise
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    chunks = ChatChunks(created.id, meta, include_usage=include_usage, after=cursor)
    return sdk_stream(svc, created.id, chunks, release)


def _cursor(body: ChatRequest, idempotency_key: str | None, last_event_id: str | None) -> str | None:
    try:
        cursor = parse_cursor(last_event_id)
    except CursorError as exc:
        raise ApiError(400, "bad_cursor", str(exc)) from None
    if cursor is not None and (not body.stream or idempotency_key is None):
        message = (
            "Last-Event-ID resumes a streamed completion: send it with `stream: true` and the "
            "Idempotency-Key and body that started it"
        )
        raise ApiError(400, "bad_cursor", message)
    return cursor


class ChatChunks:
    """Stored events as ``chat.completion.chunk`` frames, each with its event's cursor as ``id``:
    the role when the model starts, one chunk per delta, the finish reason, the usage (if asked),
    ``[DONE]``. Frames up to the cursor ``after`` are folded, not written."""

    def __init__(
        self, stream_id: str, meta: dict[str, str], *, include_usage: bool, after: str | None
    ) -> None:
        self.finished = False
        self._stream_id = stream_id
        self._head = {
            "id": f"chatcmpl-{stream_id}",
            "object": "chat.completion.chunk",
            "created": seconds(meta.get("created_at")),
            "model": meta.get("model", ""),
            "system_fingerprint": None,
        }
        self._include_usage = include_usage
        self._after = id_key(after) if after is not None else None
        self._started = False
        self._deltas = 0

    def __call__(self, entries: Sequence[Entry]) -> bytes:
        out: list[str] = []
        for e in entries:
            if self.finished:
                break
            frames = self._frames(e)
            if self._after is None or id_key(e.id) > self._after:
                out.extend(f"id: {e.id}\ndata: {f}\n\n" for f in frames)
        return "".join(out).encode()

    def _frames(self, e: Entry) -> list[str]:
        match e.type:
            case "started" if not self._started:
                self._started = True
                return [self._chunk({"role": "assistant", "content": ""})]
            case "delta":
                self._deltas += 1
                return [self._chunk({"content": json.loads(e.data)["text"]})]
            case "reset" if self._deltas:
                return self._end(stream_error("stream_reset", reset_message(self._stream_id)))
            case "done":
                data = json.loads(e.data)
                frames = [self._chunk({}, data["finish_reason"])]
                if self._include_usage:
                    usage = data.get("usage") or {"completion_tokens": self._deltas}
                    frames.append(dumps(self._head | {"choices": [], "usage": usage}))
                self.finished = True
                return [*frames, "[DONE]"]
            case "error":
                data = json.loads(e.data)
                return self._end(stream_error(data["code"], data["message"]))
            case "cancelled":
                message = f"the generation was cancelled (POST /v1/streams/{self._stream_id}/cancel)"
                return self._end(stream_error("cancelled", message))
        return []  # queued; a later attempt's start; a reset before any text

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = self._head | {"choices": [choice]}
        if self._include_usage:
            chunk["usage"] = None
        return dumps(chunk)

    def _end(self, error: dict[str, Any]) -> list[str]:
        self.finished = True
        return [dumps({"error": error})]


# A whole answer that ended in error: the status an OpenAI client expects for it.
_STATUS = {"upstream_bad_request": 400, "upstream_rate_limited": 429}


async def _whole(svc: Services, stream_id: str) -> JSONResponse:
    """Wait for the end of the stream; its answer as a ``chat.completion``, or its error. Nothing was
    delivered before, so a reset is invisible: the answer is the last attempt's."""
    meta = await svc.store.meta(stream_id)
    entries: list[Entry] = []
    async with aclosing(svc.hub.tail(stream_id, START, 0, resumable=False)) as events:
        async for item in events:
            if isinstance(item, Batch):
                entries.extend(item.entries)
    headers = {"X-Tailgate-Stream-Id": stream_id}
    end = entries[-1]
    data = json.loads(end.data)
    if end.type == "error":
        status = _STATUS.get(data["code"], 502 if data["code"].startswith("upstream_") else 500)
        return error_response(status, data["code"], data["message"], headers)
    if end.type == "cancelled":
        message = f"the generation was cancelled (POST /v1/streams/{stream_id}/cancel)"
        return error_response(409, "cancelled", message, headers | {"x-should-retry": "false"})
    text: list[str] = []
    for e in entries:
        if e.type == "reset":
            text.clear()
        elif e.type == "delta":
            text.append(json.loads(e.data)["text"])
    answer = AssistantMessage(content="".join(text))
    completion = ChatCompletion(
        id=f"chatcmpl-{stream_id}",
        created=seconds(meta.get("created_at")),
        model=meta.get("model", ""),
        choices=[Choice(index=0, message=answer, finish_reason=data["finish_reason"])],
        usage=data.get("usage"),
    )
    return JSONResponse(completion.model_dump(), headers=headers)
