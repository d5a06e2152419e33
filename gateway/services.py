"""What every route works with: the Redis clients and what is built on them, one set per process.

They open in the app's ``lifespan`` (:func:`opened`) and close there; nothing talks to Redis at
import time. Routes get them as a dependency, :data:`Svc`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from arq.connections import ArqRedis
from fastapi import Depends, Request
from redis.asyncio import Redis

from gateway.admission import Admission, ReaderSlots
from gateway.auth import Auth
from gateway.hub import Hub, PlainHub, ShardedHub
from tailgate import tuning
from tailgate.connections import Cluster, node_url, open_queue, open_store, open_subscriber
from tailgate.settings import Settings
from tailgate.store import StreamStore

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    streams: Redis
    queue: ArqRedis
    store: StreamStore
    hub: Hub
    auth: Auth
    admission: Admission
    readers: ReaderSlots
    draining: bool = False  # set on SIGTERM: readiness fails so the load balancer moves on


@asynccontextmanager
async def opened(settings: Settings) -> AsyncIterator[Services]:
    """The services for ``settings``, closed on exit: the hub first, then the clients."""
    store = await open_store(settings, "gateway", tuning.GATEWAY_STREAMS_POOL)
    streams = store.redis
    queue = open_queue(settings, "gateway", tuning.GATEWAY_QUEUE_POOL)
    hub: Hub
    if store.sharded:
        assert isinstance(store.redis, Cluster)

        def at(host: str, port: int) -> Redis:
            return open_subscriber(node_url(settings.streams_url, host, port), "gateway")

        hub = ShardedHub(store.redis, at, store, idle_check_s=settings.ping_s)
    else:
        subscriber = open_subscriber(settings.streams_url, "gateway", nodes=store.nodes)
        hub = PlainHub(subscriber, store, idle_check_s=settings.ping_s)
    try:
        await hub.start()
        auth = await Auth.load(settings, streams)
        admission = Admission(settings, queue)
        readers = ReaderSlots(settings.max_sse_per_key)
        svc = Services(settings, streams, queue, store, hub, auth, admission, readers)
        log.info("gateway ready")
        yield svc
    finally:
        await hub.close()
        await store.aclose()
        await queue.aclose()


async def services(request: Request) -> Services:
    """The process's services (a dependency)."""
    return request.app.state.svc  # type: ignore[no-any-return]


Svc = Annotated[Services, Depends(services)]
