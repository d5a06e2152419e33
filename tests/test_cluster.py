"""Redis Cluster, all real: a cluster of three masters and three replicas
(``tailgate.dev.procs.RedisCluster``), checked alone with redis-py's cluster client: every master
serves keys, and a manual failover (``CLUSTER FAILOVER``) loses none of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis
from redis.asyncio import RedisCluster as ClusterClient

from tailgate.dev.procs import RedisCluster


@pytest.fixture
def own_cluster() -> Iterator[RedisCluster]:
    """A cluster of this test's own, to fail over."""
    with RedisCluster() as c:
        yield c


async def test_the_kits_cluster_serves_every_master_and_keeps_writes_through_a_failover(
    own_cluster: RedisCluster,
) -> None:
    c = own_cluster
    written = {f"kit:{{{i}}}": str(i) for i in range(30)}  # 30 hash tags: slots all over
    async with ClusterClient.from_url(c.url, decode_responses=True) as client:
        for key, value in written.items():
            assert await client.set(key, value)
        masters = {key: await c.amaster_of(key) for key in written}
        assert len({m.port for m in masters.values()}) == 3
        assert c.url in {m.url for m in masters.values()}  # the URL names a master at the start
        key = next(iter(written))
        before = masters[key]
        replica = await asyncio.to_thread(c.replica_of, before)

        promoted = await c.afailover(key)

        assert promoted is replica
        assert await c.amaster_of(key) is promoted
        assert await asyncio.to_thread(c.replica_of, promoted) is before  # the old master follows it
        assert {k: await client.get(k) for k in written} == written  # redirected, nothing lost
        assert await client.set(key, "after")
    async with Redis.from_url(promoted.url, decode_responses=True) as direct:
        assert await direct.get(key) == "after"
