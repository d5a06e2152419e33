"""The gateway's FastAPI app: lifespan, middleware, error handlers and one router per surface.

Routes live in their surface's module (``native``, ``tutorial``, ``chat``, ``responses``,
``health``, ``web``); what surfaces share lives beside them (``services``, ``dependencies``,
``creation``, ``sse``, ``openai_wire``). A new surface is a new router module included here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import chat, health, native, responses, tutorial, web
from gateway.admission import BodyLimit
from gateway.errors import ApiError, on_api_error, on_http_error, on_redis_error, on_validation_error
from gateway.services import opened
from tailgate.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    """The app for ``settings``. Its services open in ``lifespan``, not here: no I/O at build time."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with opened(settings) as svc:
            app.state.svc = svc
            yield

    app = FastAPI(title="tailgate", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RedisConnectionError, on_redis_error)
    app.add_exception_handler(RedisTimeoutError, on_redis_error)
    app.add_exception_handler(RedisClusterException, on_redis_error)  # a cluster it cannot map
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
    app.include_router(native.router)
    app.include_router(tutorial.router)
    app.include_router(chat.router)
    app.include_router(responses.router)
    app.include_router(health.router)
    app.include_router(web.router)
    if settings.demo:
        app.include_router(web.demo_router)
    return app
