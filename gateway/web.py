"""The browser surface: the ES module at ``GET /v1/client.js`` and, with ``TAILGATE_DEMO=true``, the
demo page at ``GET /demo`` with its create route ``POST /demo/streams``.

The files live in ``gateway/static`` (package data, so they ship in the wheel). None of these routes
is in the OpenAPI schema: they are not the API.

How the demo creates streams without a key in the page. A browser must never hold an API key: in a
real application the page asks its own backend, which holds the key, to create the stream, and
follows it with the read token it gets back. The demo page has no backend but the gateway, so
``POST /demo/streams`` plays that backend: it creates the stream with the first key of
``TAILGATE_API_KEYS``, server-side, and answers what ``POST /v1/streams`` answers (id and read
token). That route lets anyone who can reach the gateway spend that key's quota, which is why the
demo is a development feature, off unless ``TAILGATE_DEMO=true`` (``tailgate dev`` turns it on).
Bounded all the same: the key's limits (rate, active streams) apply, the route takes a prompt and
nothing else (model and ``max_tokens`` are the gateway's defaults), and it refuses a request that a
page on another origin sent.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from urllib.parse import urlsplit

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from gateway.creation import StreamCreated, StreamRequest, start
from gateway.errors import ApiError
from gateway.services import Svc
from tailgate.settings import Settings

router = APIRouter(include_in_schema=False)
demo_router = APIRouter(include_in_schema=False)

JAVASCRIPT = "text/javascript; charset=utf-8"
HTML = "text/html; charset=utf-8"


@router.get("/v1/client.js")
async def client_js(request: Request) -> Response:
    """The browser module. Any origin may import it (a module script is fetched with CORS)."""
    return _asset(request, "client.js", JAVASCRIPT, {"Access-Control-Allow-Origin": "*"})


@demo_router.get("/demo")
async def demo_page(request: Request) -> Response:
    return _asset(request, "demo.html", HTML, {"X-Frame-Options": "DENY"})


class DemoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=8000)


@demo_router.post("/demo/streams", status_code=202)
async def demo_create(svc: Svc, request: Request, body: DemoRequest) -> StreamCreated:
    """Create a stream for the demo page with the demo's key (see the module docstring)."""
    _refuse_other_sites(request)
    owner = await svc.auth.owner(demo_key(svc.settings))
    return await start(svc, owner, StreamRequest(prompt=body.prompt))


def demo_key(settings: Settings) -> str | None:
    """The key the demo creates streams with: the first of ``TAILGATE_API_KEYS`` (``None``: there
    is none, which ``Settings`` allows only with auth off)."""
    return next((k.strip() for k in settings.api_keys.split(",") if k.strip()), None)


def _refuse_other_sites(request: Request) -> None:
    """403 for a request a page on another origin sent: a form or fetch there must not spend the
    demo's key. Browsers say where a request comes from (``Sec-Fetch-Site``, ``Origin``); curl says
    nothing and is let through, as it could be anyway."""
    site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    if site not in (None, "same-origin") or (
        origin is not None and urlsplit(origin).netloc != request.headers.get("host")
    ):
        raise ApiError(403, "cross_origin", "the demo creates streams for its own page only")


def _asset(request: Request, name: str, media_type: str, headers: dict[str, str]) -> Response:
    body, etag = _read(name)
    headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", **headers}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


@functools.cache
def _read(name: str) -> tuple[bytes, str]:
    """A file of ``gateway/static`` and its ETag, read once per process (on first use, not import)."""
    body = (resources.files("gateway") / "static" / name).read_bytes()
    return body, f'"{hashlib.sha256(body).hexdigest()[:32]}"'
