"""The native API: create a stream, read its status, cancel it, and follow its events over SSE."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Header, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from gateway import sse
from gateway.creation import StreamCreated, StreamRequest, start
from gateway.dependencies import Caller, Cursor, OwnedStream, ReadableStream, Stream
from gateway.errors import ApiError, documented
from gateway.services import Services, Svc
from tailgate import keys
from tailgate.events import START, Entry, dumps
from tailgate.store import is_finished, iso

router = APIRouter(
    prefix="/v1/streams", tags=["streams"], responses=documented(400, 401, 404, 413, 422, 429, 503)
)


@router.post("", status_code=202, responses=documented(409))
async def create_stream(
    svc: Svc,
    owner: Caller,
    body: StreamRequest,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> StreamCreated:
    """Queue a generation; answers at once with the stream's id and URLs."""
    if idempotency_key is not None and not idempotency_key.strip():
        raise ApiError(400, "bad_idempotency_key", "the Idempotency-Key header is empty; send a key or none")
    created = await start(svc, owner, body, idempotency_key)
    response.headers["Location"] = created.status_url
    return created


class CancelAnswer(BaseModel):
    id: str
    status: str
    cancel_requested: bool


@router.get("/{stream_id}")
async def stream_status(svc: Svc, stream: OwnedStream) -> dict[str, Any]:
    """The stream's status, timings, attempt, event count and usage; while it is queued, its
    ``position`` in the queue (1: next to start)."""
    meta = stream.meta
    position = None
    if meta["status"] == "queued":
        rank = await svc.queue.zrank(svc.settings.queue_name, stream.id)
        position = None if rank is None else rank + 1  # None: a worker has just taken it
    return {
        "id": stream.id,
        "status": meta["status"],
        "position": position,
        "created_at": iso(meta.get("created_at")),
        "started_at": iso(meta.get("started_at")),
        "finished_at": iso(meta.get("finished_at")),
        "model": meta.get("model"),
        "attempt": int(meta.get("attempt", 0)),
        "events": int(meta.get("seq", 0)),
        "usage": json.loads(meta["usage"]) if meta.get("usage") else None,
        "error": json.loads(meta["error"]) if meta.get("error") else None,
        "metadata": json.loads(meta["metadata"]) if meta.get("metadata") else None,
    }


@router.post(
    "/{stream_id}/cancel",
    response_model=CancelAnswer,
    responses={202: {"model": CancelAnswer, "description": "Requested; the running stream ends soon"}},
)
async def cancel_stream(svc: Svc, stream: OwnedStream) -> JSONResponse:
    """Stop generation. Idempotent; a running stream ends with `cancelled` once its worker stops."""
    status = await svc.store.cancel(stream.id)  # a queued stream ends here, in the script
    if status == "running":
        await svc.queue.publish(keys.CANCEL_CHANNEL, stream.id)
    code = 202 if status == "running" else 200
    return JSONResponse({"id": stream.id, "status": status, "cancel_requested": True}, status_code=code)


@router.get(
    "/{stream_id}/events",
    response_model=None,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The events, as Server-Sent Events"},
        204: {"description": "The reader already has the whole stream: stop reconnecting"},
    },
)
async def stream_events(svc: Svc, stream: ReadableStream, cursor: Cursor) -> Response:
    """The SSE stream, from the start or after the cursor; 204 after the end (EventSource stops)."""
    resume = await _resume(svc, stream, cursor)
    if resume is None:
        return Response(status_code=204)  # tells EventSource to stop reconnecting
    release = svc.readers.take(stream.meta["owner"])
    return sse.respond(
        svc.hub.tail(stream.id, resume.after, resume.seq),
        sse.native_wire(svc.settings.sse_retry_ms),
        stream_id=stream.id,
        send_timeout=svc.settings.send_timeout_s,
        first=resume.first,
        on_close=release,
    )


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a reader picks up: after entry ``after`` (whose seq is ``seq``), once ``first`` is sent."""

    after: str = START
    seq: int = 0
    first: tuple[Entry, ...] = ()


async def _resume(svc: Services, stream: Stream, cursor: str | None) -> Resume | None:
    """Where to resume after ``cursor``; ``None``: the reader already has the whole stream."""
    if cursor is None or cursor == START:
        return Resume()
    at = await svc.store.at(stream.id, cursor)
    if at is None:
        # Older than retention, or newer than the stream's end (a failover lost its tail): never a
        # silent gap, the client starts over.
        reason = {"seq": 0, "attempt": int(stream.meta.get("attempt", 0)), "reason": "cursor_out_of_range"}
        return Resume(first=(Entry(START, "reset", dumps(reason), 0),))
    if is_finished(stream.meta.get("status")) and cursor == stream.meta.get("last_id"):
        return None
    return Resume(cursor, at.seq)
