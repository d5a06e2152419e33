"""The gateway process: uvicorn with an ordered shutdown.

On SIGTERM (or the first Ctrl-C): readiness fails at once, so load balancers stop sending new
requests, while everything in flight keeps being served for ``drain_s``; then every SSE reader is
ended with a ``retry:`` hint (clients reconnect to another replica and resume from their cursor) and
uvicorn stops accepting, waits for the rest up to ``shutdown_grace_s``, and cancels what is left.
A second signal skips the wait.

``tailgate gateway --workers N``: N of these processes under a supervisor (``tailgate.supervisor``),
which forwards the SIGTERM, so each shuts down as above. Each listens on the port with a socket of
its own (``SO_REUSEPORT``), and the kernel spreads new connections over them by their addresses: one
shared socket would let whichever process wakes first accept a whole burst (asyncio accepts up to
the backlog at a time), which left the other idle in the tests. The price: connections still in the
queue of a process that closes its socket are reset, which happens only once its drain is over.

sse-starlette would cancel SSE responses on the first signal itself; that is switched off here.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI
from sse_starlette.sse import AppStatus

from gateway.app import create_app
from gateway.protocol import GuardedProtocol
from gateway.services import Services
from tailgate import tuning
from tailgate.settings import Settings

log = logging.getLogger(__name__)


class GatewayServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_s = drain_s
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self._loop.call_soon_threadsafe(self._drain, sig)

    def _drain(self, sig: int) -> None:
        svc: Services | None = getattr(self._app.state, "svc", None)
        if svc is not None:
            svc.draining = True
        log.info("draining for %.1fs before shutdown", self._drain_s)

        def finish() -> None:
            if svc is not None:
                svc.hub.release()
            super(GatewayServer, self).handle_exit(sig, None)

        assert self._loop is not None
        self._loop.call_later(self._drain_s, finish)


def serve(settings: Settings, host: str, port: int, *, reuse_port: bool = False) -> None:
    """Serve on ``host``:``port`` until SIGTERM/SIGINT. ``reuse_port``: beside the other processes of
    ``tailgate gateway --workers N`` (see the module docstring)."""
    AppStatus.disable_automatic_graceful_drain()  # type: ignore[no-untyped-call]
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        timeout_keep_alive=settings.keepalive_s,
        http=GuardedProtocol.configured(
            request_timeout_s=settings.request_timeout_s,
            max_header_bytes=settings.max_header_bytes,
            max_connections=settings.max_connections,
        ),
        backlog=tuning.GATEWAY_LISTEN_BACKLOG,
    )
    sockets = [_listen(host, port)] if reuse_port else None
    GatewayServer(config, app, settings.drain_s).run(sockets)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server(
        (host, port), family=family, backlog=tuning.GATEWAY_LISTEN_BACKLOG, reuse_port=True
    )
