"""Acknowledged means replicated, when an operator says replicas are expected (``TAILGATE_REPLICA_ACKS``).

Redis replicates asynchronously: a primary answers a write before any replica has it, so when a
Sentinel promotes a replica, the writes of the last moments before the primary died may be missing.
With ``TAILGATE_REPLICA_ACKS=n`` (n ≥ 1), tailgate acknowledges nothing until n replicas have it:

- a create answers 202 only once n replicas have the stream and, after it, its job; if they do not
  within ``TAILGATE_REPLICA_ACK_TIMEOUT_MS``, the create is taken back and the client gets 503;
- a worker starts an attempt only once n replicas have its claim; else ARQ runs the job again;
- a worker moves past an append only once n replicas have it; else it sends it again (the append
  script recognises a replay by its ``seq``), as it does through any outage;
- a cancel answers only once n replicas have it; else 503.

How: in the same pipeline as the write (so on the same connection, to the same server, even when
redis-py re-sends the pipeline on a new connection after a failover), ``PUBLISH tg:replicated`` and
``WAIT n timeout``. WAIT waits for the connection's own last replicated write; the PUBLISH is one
that Redis always replicates, so WAIT covers everything written before it on that server, however
it got there: a recognised replay writes nothing, and the first send of it may have gone through
another connection. A shortfall raises :class:`NotReplicated`, a ``ConnectionError``, so every path
that rides out an outage rides it out too.

What it guarantees: a Sentinel promotes the replica with the most data (among those of equal
``replica-priority``), so what n ≥ 1 replicas acknowledged survives the loss of the primary, unless
those replicas are lost with it. What it costs: one replica round trip per write, and no writes at
all while fewer than n replicas are connected: run n + 1 replicas to keep writing while one is down.
Readers may see an event before its replicas do (the gateway hears of it from the primary); if the
primary then dies, the attempt writes it again, the same, and readers drop it by ``seq``
(``gateway.hub``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError

from tailgate import keys


class NotReplicated(RedisConnectionError):
    """Fewer replicas than ``TAILGATE_REPLICA_ACKS`` acknowledged a write in time."""


@dataclass(frozen=True, slots=True)
class Replicas:
    """How many replicas must acknowledge a write (0: none, do not wait) and for how long at most."""

    acks: int = 0
    timeout_ms: int = 1000

    def wait(self, pipe: Pipeline) -> int:
        """Queue the wait for the replicas on ``pipe``, after its writes; how many replies it adds
        (0 when no replicas are expected)."""
        if not self.acks:
            return 0
        pipe.publish(keys.REPLICATED, "")
        pipe.wait(self.acks, self.timeout_ms)
        return 2

    def check(self, replies: list[Any], what: str) -> list[Any]:
        """The replies of the writes, without those :meth:`wait` added, which say whether enough
        replicas acknowledged ``what`` (else :class:`NotReplicated`)."""
        if not self.acks:
            return replies
        acked = replies[-1]
        if isinstance(acked, Exception):
            raise acked
        if int(acked) < self.acks:
            raise NotReplicated(
                f"{what}: {acked} of {self.acks} replicas acknowledged it in {self.timeout_ms} ms"
            )
        return replies[:-2]


UNREPLICATED = Replicas()  # no replicas expected: writes are acknowledged when the primary has them
