"""Redis clients, built the same way for every process, and the one retry policy for Redis outages.

Every client of every command (gateway, worker, ``tailgate top``, ``tailgate keys``, the dev kit) is
made here, from a URL: ``redis://``, ``rediss://`` or ``unix://`` as redis-py reads them, or
``redis+sentinel://`` for a primary that Sentinels watch (``tailgate.sentinel``: its connections
follow the primary through a failover). Clients have bounded pools and a client name per process
(`CLIENT LIST` shows which gateway or worker holds which connection). Their connections pack
commands with hiredis, in C: redis-py's asyncio connection packs in Python, ~20 µs for an append's
arguments, an eighth of a worker's CPU per token.

Retries, in two layers, both with jitter so that a fleet reconnecting after a Redis restart does not
retry in lockstep:

- **Commands** (``command_retry``): redis-py's own ``Retry`` with full-jitter exponential backoff
  re-sends a command whose connection failed. Only for clients whose commands are safe to repeat
  (reads, ``SET NX``, the create and cancel scripts): a command can be applied and its reply lost.
  The worker's store has none: its appends and claims are fenced scripts whose replays the worker
  recognises itself.
- **Loops** (``ride_out``): a loop that must survive an outage (the hub's subscription, the
  appender, the worker's side loops) awaits its call through stamina, which retries with capped,
  jittered exponential backoff, for ever or for a given patience.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import hiredis
import stamina
from arq.connections import ArqRedis
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import FullJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from tailgate import sentinel, tuning
from tailgate.settings import Settings
from tailgate.store import StreamStore

log = logging.getLogger(__name__)

# What an unreachable or restarting Redis raises; every loop that rides out an outage catches these.
# (redis-py's cluster client raises RedisClusterException, not a ConnectionError, when it cannot map
# the cluster: no node it knows answers, or the slots are not all served, as in a failover.)
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, RedisClusterException)

T = TypeVar("T")


def command_retry() -> Retry:
    """redis-py's retry for one command: a few quick re-sends, full jitter."""
    return Retry(
        FullJitterBackoff(cap=tuning.COMMAND_RETRY_CAP_S, base=tuning.COMMAND_RETRY_BASE_S),
        tuning.COMMAND_RETRIES,
    )


async def ride_out(call: Callable[[], Awaitable[T]], *, patience_s: float | None = None) -> T:
    """``await call()``, retrying through a Redis outage with capped, jittered exponential backoff,
    for ``patience_s`` (``None``: until Redis is back). The first try costs nothing extra, so this
    sits on hot paths too. After ``patience_s`` the last error is raised."""
    try:
        return await call()
    except REDIS_ERRORS:
        pass
    async for attempt in stamina.retry_context(
        on=REDIS_ERRORS,
        attempts=None,
        timeout=patience_s,
        wait_initial=tuning.BACKOFF_FIRST_S,
        wait_max=tuning.BACKOFF_MAX_S,
        wait_jitter=tuning.BACKOFF_FIRST_S,
    ):
        with attempt:
            return await call()
    raise AssertionError("unreachable: stamina raises once it gives up")


def _resend() -> dict[str, Any]:
    """The connection options that re-send a command whose connection failed (``command_retry``)."""
    return {"retry": command_retry(), "retry_on_error": list(REDIS_ERRORS)}


class _HiredisPacking:
    """Packs commands as redis-py does (the same bytes), with ``hiredis.pack_command``."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # `SCRIPT LOAD`, `CLIENT SETNAME`, ...
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]


_PACKING: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _packing(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    if cls not in _PACKING:
        _PACKING[cls] = type(cls.__name__, (_HiredisPacking, cls), {})
    return _PACKING[cls]


def client_name(role: str) -> str:
    return f"tailgate-{role}-{os.getpid()}"


def _pool(url: str, role: str, size: int, **options: Any) -> ConnectionPool:
    """A pool of at most ``size`` connections to the Redis ``url`` names (a caller waits for one past
    that), each named for ``role`` and this process."""
    options |= {"max_connections": size, "client_name": client_name(role)}
    if sentinel.is_sentinel(url):
        pool: ConnectionPool = sentinel.pool(url, **options)
    else:
        pool = BlockingConnectionPool.from_url(url, **options)
    pool.connection_class = _packing(pool.connection_class)  # whatever its kind: TCP, TLS, unix, Sentinel
    return pool


def open_client(url: str, role: str, *, pool_size: int = 2, socket_timeout: float | None = None) -> Redis:
    """A plain client (strings, not bytes) for ``tailgate top``, ``tailgate keys`` and the dev kit;
    its commands are re-sent after a broken connection."""
    pool = _pool(url, role, pool_size, decode_responses=True, socket_timeout=socket_timeout, **_resend())
    return Redis.from_pool(pool)


def open_subscriber(url: str, role: str, *, nodes: list[tuple[str, int]] | None = None) -> Redis:
    """A client of one connection (strings), for one pub/sub subscription whose owner connects it
    again itself: it re-sends nothing, so no caller but the owner reconnects it (``gateway.hub``).
    ``nodes``: a cluster's nodes (host, port), where it connects when ``url``'s node does not answer:
    a cluster copies plain pub/sub to every node, so any of them will do."""
    pool = _pool(url, role, 1, decode_responses=True)
    if nodes:
        pool.connection_class = _any_of(pool.connection_class, nodes)
    return Redis.from_pool(pool)


def _any_of(cls: type[AbstractConnection], nodes: list[tuple[str, int]]) -> type[AbstractConnection]:
    """``cls``, connecting to the first of its own address and ``nodes`` that answers."""

    class AnyOf(cls):  # type: ignore[valid-type,misc]
        async def _connect(self) -> None:
            here: tuple[str, int] = (self.host, self.port)  # type: ignore[has-type]
            others = [here, *(n for n in nodes if n != here)]
            for i, (host, port) in enumerate(others):
                self.host, self.port = host, port
                try:
                    return await super()._connect()  # type: ignore[no-any-return]
                except (OSError, TimeoutError):
                    if i == len(others) - 1:
                        raise

    return AnyOf


class _Listed(dict[str, ClusterNode]):
    """A cluster client's startup nodes, whose ``values()`` is a list: redis-py 5.3 iterates them
    across awaits while other tasks drop a node that failed or add one back (``RuntimeError:
    dictionary changed size during iteration``, which a reader's catch-up met in a failover)."""

    def values(self) -> list[ClusterNode]:  # type: ignore[override]
        return list(super().values())


class Cluster(RedisCluster):
    """redis-py's cluster client, which maps the cluster again from every node it learned at start.
    Its own list of nodes to ask loses each node a command failed on, and a failover under load could
    empty it ("Redis Cluster cannot be connected"), after which it never connects again."""

    seeds: tuple[tuple[str, int], ...] = ()

    async def initialize(self) -> RedisCluster:
        self._seed()
        return await super().initialize()

    def _seed(self) -> None:
        manager = self.nodes_manager
        for host, port in self.seeds:
            node = ClusterNode(host, port, **manager.connection_kwargs)
            manager.startup_nodes.setdefault(node.name, node)

    async def remap(self) -> None:
        """Ask the cluster again which node serves which slot (after a failover), keeping the
        connections it has; one at a time, as redis-py's own ``initialize`` does."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            self._seed()
            await self.nodes_manager.initialize()

    def primary_of(self, key: str) -> tuple[str, int]:
        """The (host, port) of the primary that serves ``key``'s slot, as the client last learned.
        Raises ``SlotNotCoveredError`` (a ``RedisClusterException``) while it knows of none."""
        node = self.get_node_from_key(key)
        assert node is not None, "a primary, as replica=False"
        return node.host, int(node.port)

    async def sharded_pubsub(self) -> bool:
        """Whether every node runs Redis 7 or later, and so has sharded pub/sub."""
        for node in self.get_nodes():
            info = await node.execute_command("INFO", "server")
            if int(str(info["redis_version"]).split(".")[0]) < 7:
                return False
        return True


def node_url(url: str, host: str, port: int) -> str:
    """``url`` (its scheme, credentials, database, options) for the node at ``host``:``port``."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@" * bool(credentials) + (f"[{host}]" if ":" in host else host) + f":{port}"
    return urlunsplit(parts._replace(netloc=netloc))


class ClusterMisconfigured(RuntimeError):
    """The streams Redis is a cluster, in a setup that cannot work with one."""


async def is_cluster(url: str, *, wait: bool = True) -> bool:
    """Whether ``url`` names a node of a Redis Cluster (``INFO cluster``). ``wait``: through an
    outage, until Redis answers (a gateway or worker starting); else its error is raised."""
    if sentinel.is_sentinel(url) or url.startswith("unix:"):
        return False  # a Sentinel's primary is no cluster node; nor is a socket
    probe = Redis.from_url(url, decode_responses=True, socket_timeout=5, client_name=client_name("probe"))
    try:
        info = await (ride_out(lambda: probe.info("cluster")) if wait else probe.info("cluster"))
    finally:
        await probe.aclose()
    return str(info.get("cluster_enabled", "0")) == "1"


async def open_store(
    settings: Settings, role: str, pool_size: int, *, retry: bool = True, wait: bool = True
) -> StreamStore:
    """The streams Redis (strings, not bytes) behind a :class:`StreamStore`. ``retry``: re-send
    commands whose connection failed (see the module docstring). ``wait``: for the streams Redis to
    answer (see :func:`is_cluster`).

    A URL that names a node of a Redis Cluster opens a cluster client, and the store keeps its
    bookkeeping on the queue's Redis (``tailgate.store``, "Redis Cluster"), which must then be
    another Redis: ARQ does not run on a cluster."""
    options: dict[str, Any] = {"decode_responses": True, **(_resend() if retry else {})}
    store: dict[str, Any] = {
        "maxlen": settings.stream_maxlen,
        "retention_s": settings.retention_s,
        # A stream that never finishes (lost with its queue, say) still expires eventually.
        "live_ttl_s": settings.retention_s + settings.job_timeout_s * 4,
        "replicas": settings.replicas,
    }
    if not await is_cluster(settings.streams_url, wait=wait):
        return StreamStore(Redis.from_pool(_pool(settings.streams_url, role, pool_size, **options)), **store)
    if settings.queue_url == settings.streams_url:
        raise ClusterMisconfigured(
            "the streams' Redis is a Redis Cluster, and the queue's URL names it too: ARQ's queue needs "
            "a single Redis (or Sentinel); set TAILGATE_QUEUE_REDIS_URL to one"
        )
    if settings.replicas.acks:
        raise ClusterMisconfigured("TAILGATE_REPLICA_ACKS is not supported with a Redis Cluster: set it to 0")
    cluster = Cluster.from_url(
        settings.streams_url,
        decode_responses=True,
        max_connections=pool_size,
        client_name=client_name(role),
        # Redirections (MOVED, ASK: a failover, a resharding) are always followed; these are the
        # tries after a broken connection, more than one only for commands safe to repeat. (A
        # pipeline's count of tries, where 0 fails with an UnboundLocalError in redis-py 5.3; every
        # fenced script goes in a pipeline: tailgate.store.)
        cluster_error_retry_attempts=tuning.COMMAND_RETRIES if retry else 1,
    )
    manager = cluster.nodes_manager
    kwargs = manager.connection_kwargs
    kwargs["connection_class"] = _packing(kwargs["connection_class"])  # as for every client here
    manager.startup_nodes = _Listed(
        {n.name: ClusterNode(n.host, n.port, **kwargs) for n in manager.startup_nodes.values()}
    )
    await (ride_out(cluster.initialize) if wait else cluster.initialize())  # learns the nodes and slots
    nodes = [(node.host, node.port) for node in cluster.get_nodes()]
    cluster.seeds = tuple(nodes)
    sharded = await (ride_out(cluster.sharded_pubsub) if wait else cluster.sharded_pubsub())
    if not sharded:
        log.warning(
            "the streams' Redis Cluster has a node older than Redis 7, without sharded pub/sub: "
            "notifications fall back to plain pub/sub, which every node copies to every other"
        )
    books = Redis.from_pool(_pool(settings.queue_url, role, pool_size, **options))
    return StreamStore(cluster, books=books, nodes=nodes, sharded=sharded, **store)


def open_queue(settings: Settings, role: str, pool_size: int) -> ArqRedis:
    """The queue Redis (bytes, as ARQ expects). ARQ's enqueue (a worker's takeover) is a WATCH
    transaction, which redis-py never re-sends; reads, publishes and the gateway's enqueue (writes
    that are no-ops when repeated) are safe to."""
    pool = _pool(settings.queue_url, role, pool_size, **_resend())
    queue = ArqRedis(connection_pool=pool)
    queue.auto_close_connection_pool = True  # as Redis.from_pool does: closing it closes its pool
    return queue
