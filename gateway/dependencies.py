"""The dependencies every surface shares: who is calling, which stream they name, where to resume.

Routes declare them as annotated parameters (``owner: Caller``, ``stream: OwnedStream``), so
OpenAPI shows them: ``/docs`` gets an Authorize button for the bearer scheme, and the routes that
need a key say so. Failures are :class:`ApiError`, so they answer in the one error shape.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Query
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.errors import ApiError
from gateway.services import Services, Svc
from tailgate import keys
from tailgate.events import CursorError, parse_cursor

# auto_error=False: a missing or non-bearer header reaches `caller`, which answers our 401, not
# FastAPI's; and the events route also accepts a read token instead.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="A tailgate API key (`TAILGATE_API_KEYS`, or `tailgate keys add`).",
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def caller(svc: Svc, credentials: Credentials) -> str:
    """The caller's owner id, from its API key; 401 ``unauthorized`` without a known one.
    With ``TAILGATE_AUTH=false`` every caller is ``anonymous``."""
    return await svc.auth.owner(credentials.credentials if credentials is not None else None)


Caller = Annotated[str, Depends(caller)]


@dataclass(frozen=True, slots=True)
class Stream:
    """A stream as a route sees it: its id and its meta hash (owner, status, attempt, last_id, …)."""

    id: str
    meta: dict[str, str]


async def find_stream(svc: Services, stream_id: str, owner: str | None) -> Stream:
    """The stream ``stream_id`` if it exists and belongs to ``owner`` (``None``: to anyone); else
    404, alike for both cases, so ids cannot be probed with another key."""
    meta = await svc.store.meta(stream_id) if keys.STREAM_ID_RE.match(stream_id) else {}
    if not meta or (owner is not None and not secrets.compare_digest(meta.get("owner", ""), owner)):
        whose = " for this key" if owner is not None else ""
        raise ApiError(404, "not_found", f"no stream {stream_id[:64]!r}{whose}")
    return Stream(stream_id, meta)


async def owned_stream(stream_id: str, svc: Svc, owner: Caller) -> Stream:
    """The caller's stream named in the path."""
    return await find_stream(svc, stream_id, owner)


OwnedStream = Annotated[Stream, Depends(owned_stream)]


TOKEN_DOC = "The stream's `read_token`, instead of an API key: a browser EventSource cannot send headers."


async def readable_stream(
    stream_id: str,
    svc: Svc,
    credentials: Credentials,
    token: Annotated[str | None, Query(description=TOKEN_DOC)] = None,
) -> Stream:
    """The stream named in the path, for a reader with the owner's API key or the stream's read token.
    A token is 401 ``invalid_token`` if it is malformed, forged, expired, for another stream, or of a
    stream whose key was revoked."""
    if token is None:
        return await find_stream(svc, stream_id, await caller(svc, credentials))
    await svc.auth.check_token(token, stream_id)
    stream = await find_stream(svc, stream_id, None)
    await svc.auth.check_owner(stream.meta.get("owner", ""))
    return stream


ReadableStream = Annotated[Stream, Depends(readable_stream)]


async def resume_cursor(
    last_event_id: Annotated[
        str | None, Header(description="Resume after this event id (wins over the query parameter).")
    ] = None,
    last_event_id_query: Annotated[
        str | None, Query(alias="last_event_id", description="Resume after this event id.")
    ] = None,
) -> str | None:
    """Where a reader resumes: after the ``Last-Event-ID`` header, else after the ``last_event_id``
    query parameter; ``None``: from the start. 400 ``bad_cursor`` if it is not a cursor we gave out."""
    try:
        return parse_cursor(last_event_id if last_event_id is not None else last_event_id_query)
    except CursorError as exc:
        raise ApiError(400, "bad_cursor", str(exc)) from None


Cursor = Annotated[str | None, Depends(resume_cursor)]
