"""Redis clients, built the same way for every process: bounded pools, and a client name per process
(`CLIENT LIST` shows which gateway or worker holds which connection)."""

from __future__ import annotations

import asyncio
import os

from arq.connections import ArqRedis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tailgate import keys
from tailgate.settings import Settings
from tailgate.store import StreamStore

# What an unreachable or restarting Redis raises; every loop that rides out an outage catches these.
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class Backoff:
    """Waits between retries while Redis is unreachable; ``reset`` after a success."""

    __slots__ = ("delay",)

    def __init__(self) -> None:
        self.delay = keys.BACKOFF_FIRST_S

    async def wait(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, keys.BACKOFF_MAX_S)

    def reset(self) -> None:
        self.delay = keys.BACKOFF_FIRST_S


def client_name(role: str) -> str:
    return f"tailgate-{role}-{os.getpid()}"


def open_store(settings: Settings, role: str, pool_size: int) -> StreamStore:
    """The streams Redis (strings, not bytes) behind a :class:`StreamStore`."""
    pool = BlockingConnectionPool.from_url(
        settings.streams_url, max_connections=pool_size, decode_responses=True, client_name=client_name(role)
    )
    return StreamStore(
        Redis(connection_pool=pool),
        maxlen=settings.stream_maxlen,
        retention_s=settings.retention_s,
        # A stream that never finishes (lost with its queue, say) still expires eventually.
        live_ttl_s=settings.retention_s + settings.job_timeout_s * 4,
    )


def open_queue(settings: Settings, role: str, pool_size: int) -> ArqRedis:
    pool = BlockingConnectionPool.from_url(
        settings.queue_url, max_connections=pool_size, client_name=client_name(role)
    )
    return ArqRedis(connection_pool=pool)
