"""OpenAI's Responses API in background mode, for any upstream: ``POST /v1/responses``,
``GET /v1/responses/{id}`` and ``POST /v1/responses/{id}/cancel``.

A response is a queued stream (``creation.start``); the worker calls the upstream's Chat Completions
as for any stream, so background mode works with any OpenAI-compatible model server. Its id is
``resp_<stream id>``: the native stream is ``/v1/streams/<stream id>``. Its parameters are kept in
the stream's meta (``response``), which also marks the stream as a response. What its events are and
how a ``reset`` shows is ``response_events``' business.

Only background mode: a request without ``background: true`` is a 400 that says so.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from contextlib import aclosing
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from gateway import sse
from gateway.creation import ChatMessage, MetadataKey, MetadataValue, start
from gateway.dependencies import Caller, Stream, find_stream
from gateway.errors import ApiError
from gateway.hub import Batch
from gateway.openai_wire import OpenAIRequest, OpenAIRoute, documented, sdk_stream
from gateway.response_events import ResponseFrames, ResponseView
from gateway.services import Services, Svc
from tailgate import keys, tuning
from tailgate.events import START, dumps

router = APIRouter(prefix="/v1/responses", tags=["openai"], route_class=OpenAIRoute)

RESPONSE_ID_RE = re.compile(r"resp_([0-9a-f]{32})")


class InputText(BaseModel):
    """Text in an input message: the user's (``input_text``) or an earlier answer's (``output_text``)."""

    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(BaseModel):
    """One message of ``input``, in either of OpenAI's forms: ``{"role", "content"}`` with content a
    string or text parts, optionally ``"type": "message"``."""

    model_config = ConfigDict(extra="ignore")  # an earlier output's `id` and `status`, passed back

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText] = Field(min_length=1)

    def chat(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return ChatMessage(role=self.role, content=text)


class ResponseRequest(BaseModel):
    """OpenAI's Responses request, the text-only part of it, in background mode."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, min_length=1, max_length=128)
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[InputMessage], Field(min_length=1, max_length=512)]
    )
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    metadata: dict[MetadataKey, MetadataValue] | None = Field(default=None, max_length=16)
    user: str | None = Field(default=None, max_length=256)
    background: bool | None = Field(default=None, description="Must be true: tailgate runs background mode.")
    stream: bool | None = False
    store: bool | None = Field(default=None, description="Background mode stores the response: true or none.")

    def stream_request(self) -> OpenAIRequest:
        messages = [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        if isinstance(self.input, str):
            messages.append(ChatMessage(role="user", content=self.input))
        else:
            messages += [m.chat() for m in self.input]
        return OpenAIRequest(
            messages=messages,
            model=self.model,
            max_tokens=self.max_output_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            metadata=self.metadata,
            user=self.user,
        )

    def params(self) -> dict[str, Any]:
        """What the response object shows of the request (kept in the stream's meta)."""
        keep = ("instructions", "max_output_tokens", "temperature", "top_p", "metadata", "user")
        return {"background": True} | self.model_dump(include=set(keep), exclude_none=True)


class OutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[Any]


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"]
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"]
    content: list[OutputText]


class ResponseObject(BaseModel):
    """OpenAI's response object, as far as a text answer has one."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled", "incomplete"]
    background: bool
    error: dict[str, str] | None
    incomplete_details: dict[str, str] | None
    model: str
    output: list[OutputMessage]
    usage: dict[str, Any] | None


def _answer(view: ResponseView) -> JSONResponse:
    return JSONResponse(view.snapshot(), headers={"X-Tailgate-Stream-Id": view.stream_id})


STREAMED = {"content": {"text/event-stream": {}}, "description": "`stream: true`: the Responses events"}


@router.post(
    "",
    response_model=None,
    responses={200: {"model": ResponseObject, **STREAMED}, **documented(400, 401, 404, 409, 413, 429, 503)},
)
async def create_response(
    svc: Svc,
    owner: Caller,
    body: ResponseRequest,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> Response:
    """Queue a response in background mode: answers it `queued` at once, or streams its events."""
    if not body.background:
        message = "tailgate runs the Responses API in background mode: send `background: true`"
        raise ApiError(400, "background_required", message + " (and `stream: true` to stream it)")
    if body.store is False:
        raise ApiError(400, "store_required", "background mode stores the response: send `store: true`")
    if idempotency_key is not None and not idempotency_key.strip():
        raise ApiError(400, "bad_idempotency_key", "the Idempotency-Key header is empty; send a key or none")
    fields = {"response": dumps(body.params())}
    if not body.stream:
        created = await start(svc, owner, body.stream_request(), idempotency_key, fields)
        # The response as created (OpenAI answers `queued`), whatever its worker has done since.
        return _answer(ResponseView(created.id, await svc.store.meta(created.id)))
    release = svc.readers.take(owner)  # before the stream exists: a refusal leaves nothing behind
    try:
        created = await start(svc, owner, body.stream_request(), idempotency_key, fields)
        meta = await svc.store.meta(created.id)
    except BaseException:
        release()
        raise
    return _events(svc, Stream(created.id, meta), -1, release)


async def _find(svc: Services, response_id: str, owner: str) -> Stream:
    """The caller's response ``response_id``; 404 alike for no such id, another key's, and a stream
    that is not a response."""
    match = RESPONSE_ID_RE.fullmatch(response_id)
    stream = await _stream_of(svc, match[1], owner) if match else None
    if stream is None or "response" not in stream.meta:
        raise ApiError(404, "not_found", f"Response with id {response_id[:64]!r} not found.")
    return stream


async def _stream_of(svc: Services, stream_id: str, owner: str) -> Stream | None:
    try:
        return await find_stream(svc, stream_id, owner)
    except ApiError:
        return None


@router.get(
    "/{response_id}",
    response_model=None,
    responses={200: {"model": ResponseObject, **STREAMED}, **documented(400, 401, 404, 429, 503)},
)
async def retrieve_response(
    svc: Svc,
    owner: Caller,
    response_id: str,
    stream: bool = False,
    starting_after: Annotated[
        int | None, Query(description="With `stream=true`: the events after this `sequence_number`.")
    ] = None,
) -> Response:
    """The response as it stands, or (`stream=true`) its events, after `starting_after` if given."""
    found = await _find(svc, response_id, owner)
    if not stream:
        return _answer(await _fold(svc, found.id, found.meta))
    return _events(svc, found, -1 if starting_after is None else starting_after, svc.readers.take(owner))


@router.post(
    "/{response_id}/cancel",
    response_model=ResponseObject,
    responses=documented(401, 404, 503),
)
async def cancel_response(svc: Svc, owner: Caller, response_id: str) -> JSONResponse:
    """Stop the generation (the upstream call is closed); answers the response, `cancelled` once its
    worker has stopped. A response that already ended is answered as it is."""
    found = await _find(svc, response_id, owner)
    if await svc.store.cancel(found.id) == "running":
        await svc.queue.publish(keys.CANCEL_CHANNEL, found.id)
    try:
        async with asyncio.timeout(tuning.RESPONSE_CANCEL_WAIT_S):
            return _answer(await _fold(svc, found.id, found.meta, wait=True))
    except TimeoutError:
        return _answer(await _fold(svc, found.id, found.meta))  # still stopping: in_progress


def _events(svc: Services, stream: Stream, after: int, release: Callable[[], None]) -> sse.SSEResponse:
    frames = ResponseFrames(ResponseView(stream.id, stream.meta), after)
    return sdk_stream(svc, stream.id, frames, release)


async def _fold(svc: Services, stream_id: str, meta: dict[str, str], *, wait: bool = False) -> ResponseView:
    """The stream's stored events folded into its response; with ``wait``, once the response ended."""
    view = ResponseView(stream_id, meta)
    if wait:
        async with aclosing(svc.hub.tail(stream_id, START, 0, resumable=False)) as events:
            async for item in events:
                if isinstance(item, Batch):
                    for e in item.entries:
                        view.apply(e)
                    if view.finished:
                        break
        return view
    after = START
    while True:
        page = await svc.store.after(stream_id, after, tuning.CATCHUP_PAGE)
        for e in page:
            view.apply(e)
        if len(page) < tuning.CATCHUP_PAGE:
            return view
        after = page[-1].id
