"""``POST /ask_query``: the original FastAPI + OpenAI streaming tutorial's endpoint, for its client.

Its body is ``{"prompt"}`` and its answer JSON lines ``{"status", "data"}`` over ``text/event-stream``
(``sse.TUTORIAL``). The generation is queued like any stream, but this reader cannot resume: it
reads from the start, and a gateway shutting down lets it finish.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from gateway import sse
from gateway.creation import StreamRequest, start
from gateway.dependencies import Caller
from gateway.errors import documented
from gateway.services import Svc
from tailgate.events import START

router = APIRouter(tags=["compatibility"], responses=documented(401, 413, 422, 429, 503))


class AskQuery(BaseModel):
    prompt: str = Field(min_length=1)


@router.post(
    "/ask_query",
    response_model=None,
    responses={200: {"content": {"text/event-stream": {}}, "description": "JSON lines, as the tutorial's"}},
)
async def ask_query(svc: Svc, owner: Caller, body: AskQuery) -> sse.SSEResponse:
    """The tutorial's endpoint: JSON lines `{"status", "data"}` over `text/event-stream`."""
    release = svc.readers.take(owner)  # before the stream exists: a refusal leaves nothing behind
    try:
        created = await start(svc, owner, StreamRequest(prompt=body.prompt))
    except BaseException:
        release()
        raise
    return sse.respond(
        svc.hub.tail(created.id, START, 0, resumable=False),
        sse.TUTORIAL,
        stream_id=created.id,
        send_timeout=svc.settings.send_timeout_s,
        on_close=release,
    )
