"""The gateway's HTTP API: create, tail, inspect and cancel streams; the tutorial's ``/ask_query``.

Connections open in ``lifespan`` and close there; nothing talks to Redis at import time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import anyio
from arq.connections import ArqRedis
from fastapi import FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest
from pydantic import BaseModel, ConfigDict, Field, model_validator
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from gateway.admission import Admission, BodyLimit, now_ms
from gateway.auth import Auth
from gateway.errors import (
    ApiError,
    error_response,
    on_api_error,
    on_http_error,
    on_redis_error,
    on_validation_error,
)
from gateway.hub import Hub
from tailgate import keys, tuning
from tailgate.connections import open_queue, open_store
from tailgate.events import START, CursorError, Entry, dumps, frames, parse_cursor
from tailgate.settings import Settings
from tailgate.store import StreamStore, is_finished

log = logging.getLogger(__name__)

# A reader ended by shutdown gets this, then the connection closes; EventSource reconnects after it.
SHUTDOWN_HINT = b"retry: 500\n\n"
KEEP_ALIVE = b": ping\n\n"
STREAMS_CREATED = Counter("tailgate_streams_created_total", "Streams accepted by this gateway")
SSE_OPEN = Gauge("tailgate_sse_connections", "Open SSE responses on this gateway")
EVENTS_SENT = Counter("tailgate_events_sent_total", "Events written to SSE clients")
HUB_SUBSCRIPTIONS = Gauge("tailgate_hub_subscriptions", "Stream channels this gateway is subscribed to")
HUB_READERS = Gauge("tailgate_hub_readers", "Readers tailing streams on this gateway")


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]]


class StreamRequest(BaseModel):
    """Body of ``POST /v1/streams``: ``messages`` or ``prompt``, and the usual sampling options."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=512)
    prompt: str | None = Field(default=None, min_length=1)
    model: str | None = Field(default=None, min_length=1, max_length=128)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)

    @model_validator(mode="after")
    def _one_input(self) -> StreamRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("send exactly one of `messages` or `prompt`")
        return self

    def upstream_request(self, default_model: str) -> dict[str, Any]:
        """What the worker sends to the model."""
        messages = (
            [m.model_dump() for m in self.messages]
            if self.messages is not None
            else [{"role": "user", "content": self.prompt}]
        )
        out: dict[str, Any] = {"model": self.model or default_model, "messages": messages}
        if self.max_tokens is not None:
            out["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            out["temperature"] = self.temperature
        return out


class AskQuery(BaseModel):
    prompt: str = Field(min_length=1)


@dataclass
class Services:
    settings: Settings
    streams: Redis
    queue: ArqRedis
    store: StreamStore
    hub: Hub
    auth: Auth
    admission: Admission
    draining: bool = False  # set on SIGTERM: readiness fails so the load balancer moves on


def _iso(ms: str | None) -> str | None:
    if not ms:
        return None
    return (
        datetime.fromtimestamp(float(ms) / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = open_store(settings, "gateway", tuning.GATEWAY_STREAMS_POOL)
        streams = store.redis
        queue = open_queue(settings, "gateway", tuning.GATEWAY_QUEUE_POOL)
        hub = Hub(streams, store, idle_check_s=settings.ping_s)
        await hub.start()
        HUB_SUBSCRIPTIONS.set_function(lambda: hub.subscriptions)
        HUB_READERS.set_function(lambda: hub.readers)
        svc = Services(
            settings,
            streams,
            queue,
            store,
            hub,
            await Auth.load(settings, streams),
            Admission(settings, streams, queue),
        )
        app.state.svc = svc
        log.info("gateway ready")
        try:
            yield
        finally:
            await hub.close()
            await streams.aclose()
            await queue.aclose()

    app = FastAPI(title="tailgate", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RedisConnectionError, on_redis_error)
    app.add_exception_handler(RedisTimeoutError, on_redis_error)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "Idempotency-Key"],
            expose_headers=["Location", "X-Tailgate-Stream-Id"],
        )

    def svc(request: Request) -> Services:
        return request.app.state.svc  # type: ignore[no-any-return]

    async def owned_meta(s: Services, stream_id: str, owner: str) -> dict[str, str]:
        """The stream's meta if it exists and belongs to ``owner``; 404 alike for both, so ids
        cannot be probed."""
        meta = await s.store.meta(stream_id) if keys.STREAM_ID_RE.match(stream_id) else {}
        if not meta or not secrets.compare_digest(meta.get("owner", ""), owner):
            raise ApiError(404, "not_found", f"no stream {stream_id[:64]!r} for this key")
        return meta

    async def start_stream(
        s: Services, owner: str, body: StreamRequest, idempotency_key: str | None
    ) -> dict[str, Any]:
        now = now_ms()
        stream_id = secrets.token_hex(16)
        idem = None
        if idempotency_key is not None:
            digest = hashlib.sha256(body.model_dump_json(exclude_none=True).encode()).hexdigest()
            idem = keys.idempotency(owner, hashlib.sha256(idempotency_key.encode()).hexdigest())
            claimed = await s.streams.set(idem, f"{stream_id} {digest}", nx=True, ex=s.settings.retention_s)
            if not claimed:
                existing = str(await s.streams.get(idem) or "")
                existing_id, _, existing_digest = existing.partition(" ")
                if existing_digest != digest:
                    raise ApiError(
                        409,
                        "idempotency_conflict",
                        "this Idempotency-Key was used with a different body; use a new key",
                    )
                return stream_created(s, existing_id)
        try:
            await s.admission.admit(owner, now)
            request = body.upstream_request(s.settings.default_model)
            fields = {"model": request["model"], "request": dumps(request)}
            if body.metadata:
                fields["metadata"] = dumps(body.metadata)
            await s.store.create(stream_id, owner, fields)
        except BaseException:
            if idem is not None:
                await s.streams.delete(idem)
            raise
        try:
            await s.queue.enqueue_job(
                keys.JOB_GENERATE, stream_id, _job_id=stream_id, _queue_name=s.settings.queue_name
            )
            await s.queue.publish(keys.WAKE_CHANNEL, stream_id)
        except Exception as exc:
            # No half-written state: a stream nobody will ever run must not exist.
            log.error("enqueue of %s failed: %s", stream_id, exc)
            await s.store.discard(stream_id)
            if idem is not None:
                await s.streams.delete(idem)
            raise ApiError(
                503, "unavailable", "the queue is unreachable; retry shortly", {"Retry-After": "1"}
            ) from exc
        STREAMS_CREATED.inc()
        log.info("stream %s queued", stream_id)
        return stream_created(s, stream_id)

    def stream_created(s: Services, stream_id: str) -> dict[str, Any]:
        return {
            "id": stream_id,
            "status": "queued",
            "events_url": f"/v1/streams/{stream_id}/events",
            "status_url": f"/v1/streams/{stream_id}",
            "read_token": s.auth.read_token(stream_id),
        }

    @app.post("/v1/streams", status_code=202)
    async def create_stream(
        request: Request,
        body: StreamRequest,
        idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    ) -> JSONResponse:
        """Queue a generation; answers at once with the stream's id and URLs."""
        s = svc(request)
        owner = await s.auth.owner(request)
        created = await start_stream(s, owner, body, idempotency_key)
        return JSONResponse(created, status_code=202, headers={"Location": created["status_url"]})

    @app.get("/v1/streams/{stream_id}")
    async def stream_status(request: Request, stream_id: str) -> dict[str, Any]:
        s = svc(request)
        meta = await owned_meta(s, stream_id, await s.auth.owner(request))
        return {
            "id": stream_id,
            "status": meta["status"],
            "created_at": _iso(meta.get("created_at")),
            "started_at": _iso(meta.get("started_at")),
            "finished_at": _iso(meta.get("finished_at")),
            "model": meta.get("model"),
            "attempt": int(meta.get("attempt", 0)),
            "events": int(meta.get("seq", 0)),
            "usage": json.loads(meta["usage"]) if meta.get("usage") else None,
            "error": json.loads(meta["error"]) if meta.get("error") else None,
            "metadata": json.loads(meta["metadata"]) if meta.get("metadata") else None,
        }

    @app.post("/v1/streams/{stream_id}/cancel")
    async def cancel_stream(request: Request, stream_id: str) -> JSONResponse:
        """Stop generation. Idempotent; a running stream ends with `cancelled` once its worker stops."""
        s = svc(request)
        owner = await s.auth.owner(request)
        await owned_meta(s, stream_id, owner)
        status = await s.store.cancel(stream_id)
        if status == "running":
            await s.queue.publish(keys.CANCEL_CHANNEL, stream_id)
        code = 202 if status == "running" else 200
        return JSONResponse({"id": stream_id, "status": status, "cancel_requested": True}, status_code=code)

    @app.get("/v1/streams/{stream_id}/events", response_model=None)
    async def stream_events(
        request: Request,
        stream_id: str,
        last_event_id_query: Annotated[str | None, Query(alias="last_event_id")] = None,
        token: str | None = None,
        last_event_id: Annotated[str | None, Header()] = None,
    ) -> Response:
        """The SSE stream; resumes after `Last-Event-ID` (header) or `last_event_id` (query)."""
        s = svc(request)
        if token is not None:
            if not s.auth.token_allows(token, stream_id):
                raise ApiError(401, "invalid_token", "the read token is expired or for another stream")
            meta = await s.store.meta(stream_id) if keys.STREAM_ID_RE.match(stream_id) else {}
            if not meta:
                raise ApiError(404, "not_found", f"no stream {stream_id[:64]!r}")
        else:
            meta = await owned_meta(s, stream_id, await s.auth.owner(request))
        try:
            cursor = parse_cursor(last_event_id if last_event_id is not None else last_event_id_query)
        except CursorError as exc:
            raise ApiError(400, "bad_cursor", str(exc)) from None

        after, last_seq, prefix = START, 0, b""
        if cursor is not None and cursor != START:
            at = await s.store.at(stream_id, cursor)
            if at is None:
                # Older than retention, or newer than the stream's end (a failover lost its tail):
                # never a silent gap, the client starts over.
                reset = dumps(
                    {"seq": 0, "attempt": int(meta.get("attempt", 0)), "reason": "cursor_out_of_range"}
                )
                prefix = Entry(START, "reset", reset, 0).frame()
            elif is_finished(meta.get("status")) and cursor == meta.get("last_id"):
                return Response(status_code=204)  # tells EventSource to stop reconnecting
            else:
                after, last_seq = cursor, at.seq

        async def body() -> AsyncIterator[bytes]:
            SSE_OPEN.inc()
            ended = False
            try:
                if prefix:
                    yield prefix
                async for entries in s.hub.tail(stream_id, after, last_seq):
                    if not entries:
                        yield KEEP_ALIVE
                        continue
                    EVENTS_SENT.inc(len(entries))
                    ended = entries[-1].terminal
                    yield frames(entries)
                if not ended:
                    yield SHUTDOWN_HINT  # this replica is going away: reconnect (elsewhere) soon
            finally:
                SSE_OPEN.dec()

        return SSEResponse(
            body(),
            send_timeout=s.settings.send_timeout_s,
            headers={"X-Tailgate-Stream-Id": stream_id},
        )

    @app.post("/ask_query", response_model=None)
    async def ask_query(request: Request, body: AskQuery) -> StreamingResponse:
        """The original tutorial's endpoint: JSON lines `{"status", "data"}` over `text/event-stream`."""
        s = svc(request)
        owner = await s.auth.owner(request)
        stream_id = (await start_stream(s, owner, StreamRequest(prompt=body.prompt), None))["id"]

        async def lines() -> AsyncIterator[bytes]:
            async for entries in s.hub.tail(stream_id, START, 0, resumable=False):
                if not entries:
                    continue  # JSON lines have no comment syntax: no keep-alive here
                out = [_tutorial_line(e) for e in entries]
                yield "".join(line for line in out if line).encode()

        return StreamingResponse(
            lines(), media_type="text/event-stream", headers={"X-Tailgate-Stream-Id": stream_id}
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=None)
    async def readyz(request: Request) -> JSONResponse:
        s = svc(request)
        if s.draining:
            return error_response(503, "not_ready", "shutting down")
        try:
            await s.streams.ping()
            await s.queue.ping()
        except Exception as exc:
            return error_response(503, "not_ready", f"Redis is unreachable: {exc}")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


class SSEResponse(EventSourceResponse):
    """sse-starlette's response running two of its four tasks per connection: the stream and the
    disconnect listener. Keep-alive comments come from the stream itself (the hub wakes an idle
    reader every ``TAILGATE_PING_S`` anyway) and shutdown is the hub's (``Hub.release``, which ends
    readers with a retry hint). That saves ~12 KiB per idle connection, a quarter of the total."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "HEAD":
            return await super().__call__(scope, receive, send)
        async with anyio.create_task_group() as tasks:

            async def stream() -> None:
                await self._stream_response(send)
                tasks.cancel_scope.cancel()

            async def disconnect() -> None:
                await self._listen_for_disconnect(receive)
                tasks.cancel_scope.cancel()

            tasks.start_soon(stream)
            tasks.start_soon(disconnect)


def _tutorial_line(e: Entry) -> str:
    data = json.loads(e.data)
    if e.type == "delta":
        status, text = "processing", data["text"]
    elif e.type == "done":
        status, text = "complete", "Stream finished"
    elif e.type == "error":
        status, text = "error", data["message"]
    elif e.type == "cancelled":
        status, text = "cancelled", "Stream cancelled"
    else:
        return ""
    return json.dumps({"status": status, "data": text}, ensure_ascii=False) + "\n"
