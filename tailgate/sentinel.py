"""Redis Sentinel: the URL that names a monitored primary, and the connection pool that follows it.

``redis+sentinel://[[username]:password@]host:port[,host:port...]/service[/db][?sentinel_password=P]``

- the hosts are Sentinels (port 26379 when left out), asked in order for the primary's address;
- ``service`` is the master name they monitor (``sentinel monitor <service> ...``);
- ``username`` and ``password`` authenticate to the primary; ``sentinel_password``, if the
  Sentinels have one (``requirepass`` in sentinel.conf), to them.

Every connection the pool opens asks the Sentinels where the primary is, so a connection that breaks
(the primary died, or was demoted and answers ``READONLY``) comes back on the new primary once a
Sentinel has promoted a replica; until then connecting fails with a ``ConnectionError``
(``MasterNotFoundError``), which the retry policy of ``tailgate.connections`` rides out like any
outage. Pub/sub connections reconnect the same way, and redis-py subscribes them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import BlockingConnectionPool
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from tailgate import tuning

SCHEME = "redis+sentinel"
FORM = "redis+sentinel://[[username]:password@]host:port[,host:port...]/service[/db]"
DEFAULT_PORT = 26379


@dataclass(frozen=True, slots=True)
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def is_sentinel(url: str) -> bool:
    return url.startswith(SCHEME + "://")


def parse(url: str) -> SentinelURL:
    """The parts of a Sentinel URL; :class:`ValueError` saying what is wrong and what is expected."""
    parts = urlsplit(url)
    if parts.scheme != SCHEME:
        raise ValueError(f"not a Sentinel URL (expected {FORM})")
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    sentinels = tuple(_address(h) for h in hosts.split(","))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError(f"a Sentinel URL names the service (the master name) after the hosts: {FORM}")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"the database after the service must be a number, not {path[1]!r}: {FORM}")
    query = parse_qs(parts.query)
    unknown = set(query) - {"sentinel_password"}
    if unknown:
        raise ValueError(f"unknown option {sorted(unknown)[0]!r} in a Sentinel URL (only sentinel_password)")
    return SentinelURL(
        sentinels=sentinels,
        service=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(username) or None,
        password=unquote(password) or None,
        sentinel_password=query["sentinel_password"][0] if "sentinel_password" in query else None,
    )


def _address(hostport: str) -> tuple[str, int]:
    host, port = hostport, ""
    if hostport.startswith("["):  # [IPv6]:port
        host, _, rest = hostport[1:].partition("]")
        port = rest.removeprefix(":")
    elif ":" in hostport:
        host, _, port = hostport.rpartition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"bad Sentinel address {hostport!r}: each is host:port ({FORM})")
    return host, int(port) if port else DEFAULT_PORT


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's Sentinel pool, bounded like tailgate's other pools: past ``max_connections`` a
    caller waits for a connection instead of failing. Closing it closes its connections to the
    Sentinels too."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # the whole pool: also what asked the Sentinels
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.aclose()


def pool(url: str, **kwargs: Any) -> BlockingSentinelPool:
    """A pool of connections to the primary that the Sentinels of ``url`` name. ``kwargs`` are the
    connection options (``max_connections``, ``decode_responses``, ``retry``...), as for
    ``BlockingConnectionPool``."""
    u = parse(url)
    manager = Sentinel(  # type: ignore[no-untyped-call]
        list(u.sentinels),
        sentinel_kwargs={
            "password": u.sentinel_password,
            # A Sentinel that is down or unreachable must not hold up asking the next one.
            "socket_connect_timeout": tuning.SENTINEL_TIMEOUT_S,
            "socket_timeout": tuning.SENTINEL_TIMEOUT_S,
        },
    )
    return BlockingSentinelPool(  # type: ignore[no-untyped-call]
        u.service,
        manager,
        is_master=True,
        db=u.db,
        username=u.username,
        password=u.password,
        **kwargs,
    )
