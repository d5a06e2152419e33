"""Starting a stream, for every surface that starts one: the request, idempotency, admission, the
store's create and the enqueue.

A surface turns its own body into a :class:`StreamRequest` and calls :func:`start`; what it answers
is its own business. A stream is queued whole or not at all. When the queue shares the streams'
Redis (the default), the store's create script enqueues the job and wakes a worker in the same
atomic step: one round trip. Otherwise the queue's depth is checked first and the job goes in one
pipeline after the create; if that fails, the store's ``discard`` takes back the create, so no
stream exists that nobody will ever run. With ``TAILGATE_REPLICA_ACKS``, the create and the job are
acknowledged by the replicas before the client hears of the stream (``tailgate.replication``); if
they are not, the create is taken back too.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from typing import Annotated, Any, Literal, assert_never

from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from gateway.errors import ApiError
from gateway.services import Services
from tailgate import keys
from tailgate.events import dumps
from tailgate.replication import NotReplicated
from tailgate.store import CreateReply, Job

log = logging.getLogger(__name__)

STREAMS_CREATED = Counter("tailgate_streams_created_total", "Streams accepted by this gateway")


# OpenAI's limits on metadata: 16 pairs, keys up to 64 characters, values up to 512.
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


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
    metadata: dict[MetadataKey, MetadataValue] | None = Field(default=None, max_length=16)

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


class StreamCreated(BaseModel):
    """What ``POST /v1/streams`` answers: where to read the stream, and a token to read it with."""

    id: str
    status: Literal["queued"] = "queued"
    events_url: str
    status_url: str
    read_token: str = Field(description="Opens this stream's events as `?token=`, for a browser EventSource.")


async def start(
    svc: Services,
    owner: str,
    body: StreamRequest,
    idempotency_key: str | None = None,
    extra_fields: dict[str, str] | None = None,
) -> StreamCreated:
    """Queue a generation for ``owner``. With ``idempotency_key``: the stream this key started
    before, if any (409 if for another body). 429 over a limit; 503 if the queue is unreachable.
    ``extra_fields``: more meta fields the surface keeps with the stream (a response's parameters).

    Idempotency, the per-key limits and the create are one atomic script: concurrent duplicates get
    the one stream or the same refusal, and no answer names a stream that does not exist."""
    one_redis = svc.settings.one_redis
    position = None if one_redis else await svc.admission.check_queue(owner)
    stream_id = secrets.token_hex(16)
    request = body.upstream_request(svc.settings.default_model)
    svc.admission.check_request(request)
    fields = {"model": request["model"], "request": dumps(request)}
    if body.metadata:
        fields["metadata"] = dumps(body.metadata)
    if extra_fields:
        fields = extra_fields | fields
    idempotency = None
    if idempotency_key is not None:
        digest = hashlib.sha256(body.model_dump_json(exclude_none=True).encode()).hexdigest()
        idempotency = (hashlib.sha256(idempotency_key.encode()).hexdigest(), digest)
    job = _job(svc, stream_id) if one_redis else None
    try:
        creation = await svc.store.create(
            stream_id,
            owner,
            fields,
            limits=svc.admission.limits,
            idempotency=idempotency,
            job=job,
            position=position,
        )
    except NotReplicated:
        await svc.store.discard(stream_id)  # on the primary, not on enough replicas: never acknowledged
        raise  # 503, as for any outage
    match creation.reply:
        case CreateReply.CREATED | CreateReply.ID_TAKEN:  # ID_TAKEN: this create, re-sent
            pass
        case CreateReply.QUEUE_FULL:
            raise svc.admission.queue_full()
        case CreateReply.EXISTING:
            return created(svc, creation.stream_id)
        case CreateReply.CONFLICT:
            message = "this Idempotency-Key was used with a different body; use a new key"
            raise ApiError(409, "idempotency_conflict", message)
        case CreateReply.RATE_LIMITED | CreateReply.TOO_MANY:
            raise svc.admission.refused(creation)
        case _:
            assert_never(creation.reply)
    if job is None:
        await _enqueue(svc, stream_id, owner)
    STREAMS_CREATED.inc()
    log.info("stream %s queued", stream_id)
    return created(svc, stream_id)


def _job(svc: Services, stream_id: str) -> Job:
    """The stream's ARQ job as ``ArqRedis.enqueue_job`` would write it (its id is the stream's)."""
    q = svc.queue
    enqueued = timestamp_ms()
    payload = serialize_job(keys.JOB_GENERATE, (stream_id,), {}, None, enqueued, serializer=q.job_serializer)
    return Job(
        queue=svc.settings.queue_name,
        key=job_key_prefix + stream_id,
        payload=payload,
        expires_ms=q.expires_extra_ms,
        max_queued=svc.settings.max_queued,
        wake=keys.wake(svc.settings.queue_name),
        fair=keys.fair(svc.settings.queue_name),
    )


async def _enqueue(svc: Services, stream_id: str, owner: str) -> None:
    """Enqueue the stream's job, fairly across owners, and wake a worker: one script on the queue's
    Redis (``scripts.ENQUEUE``), with the wait for the replicas when they are expected; if that
    fails, the store takes the create back (quota and idempotency record included) and the client
    gets 503.

    The job is written as ARQ's ``enqueue_job`` writes it, without its WATCH transaction: the id is
    new, as its create just proved, so there is nothing to watch, and a WATCH transaction cannot
    carry the WAIT on its connection. The writes are once only, so redis-py may re-send them after a
    broken connection (to the new primary, after a failover): a job that is there already stays as
    it is."""
    job = _job(svc, stream_id)
    replicas = svc.settings.replicas
    try:
        async with svc.queue.pipeline(transaction=False) as pipe:
            args: list[str | bytes | int] = [owner, stream_id, job.payload, job.expires_ms, job.wake]
            await svc.admission.enqueue(keys=[job.queue, job.fair, job.key], args=args, client=pipe)
            replicas.wait(pipe)
            replicas.check(await pipe.execute(), f"job of {stream_id}")
    except Exception as exc:
        log.error("enqueue of %s failed: %s", stream_id, exc)
        await svc.store.discard(stream_id)
        raise ApiError(
            503, "unavailable", "the queue is unreachable; retry shortly", {"Retry-After": "1"}
        ) from exc


def created(svc: Services, stream_id: str) -> StreamCreated:
    return StreamCreated(
        id=stream_id,
        events_url=f"/v1/streams/{stream_id}/events",
        status_url=f"/v1/streams/{stream_id}",
        read_token=svc.auth.read_token(stream_id),
    )
