"""What the gateway's shape promises its users: /docs knows the bearer scheme and which routes need
a key; operations routes need none; auth off means anonymous; a stream the queue refused is taken
back whole."""

from __future__ import annotations

import secrets

import httpx
from redis.asyncio import Redis

from gateway.app import create_app
from tailgate import keys
from tailgate.apikeys import owner_of
from tailgate.dev.procs import RedisServer
from tailgate.dev.sse import read_sse, text_of
from tailgate.settings import Settings
from tests.harness import MakeStack, Stack, expected_answer

UNKNOWN = "0" * 32
KEYED = {
    ("post", "/v1/streams"),
    ("get", "/v1/streams/{stream_id}"),
    ("post", "/v1/streams/{stream_id}/cancel"),
    ("get", "/v1/streams/{stream_id}/events"),
    ("post", "/ask_query"),
    ("post", "/v1/chat/completions"),
    ("post", "/v1/responses"),
    ("get", "/v1/responses/{response_id}"),
    ("post", "/v1/responses/{response_id}/cancel"),
}
OPEN = {("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics")}


def test_openapi_declares_the_bearer_scheme_and_every_keyed_route_uses_it() -> None:
    schema = create_app(Settings()).openapi()  # in-process: builds the schema, serves nothing
    schemes = schema["components"]["securitySchemes"]
    bearer = [name for name, s in schemes.items() if s["type"] == "http" and s["scheme"] == "bearer"]
    assert len(bearer) == 1, schemes

    ops = {(m, p): op for p, methods in schema["paths"].items() for m, op in methods.items()}
    assert set(ops) == KEYED | OPEN
    for route in KEYED:
        assert ops[route].get("security") == [{bearer[0]: []}], route
    for route in OPEN:
        assert not ops[route].get("security"), route
    # A browser EventSource cannot send the header: the events route documents its read token too.
    events = ops[("get", "/v1/streams/{stream_id}/events")]
    assert "token" in {p["name"] for p in events["parameters"] if p["in"] == "query"}


async def test_every_route_the_schema_marks_as_keyed_answers_401_without_a_key(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    bodies = {"/v1/streams": {"prompt": "hi"}, "/ask_query": {"prompt": "hi"}}
    for method, path in sorted(KEYED):
        for headers in ({}, {"Authorization": "Bearer not-a-key"}):
            r = await client.request(
                method,
                stack.url + path.replace("{stream_id}", UNKNOWN).replace("{response_id}", f"resp_{UNKNOWN}"),
                json=bodies.get(path),
                headers=headers,
            )
            assert r.status_code == 401, (method, path, headers)
            assert r.json()["error"]["code"] == "unauthorized"
            assert r.json()["error"]["message"]


async def test_health_readiness_and_metrics_need_no_key(client: httpx.AsyncClient, stack: Stack) -> None:
    r = await client.get(f"{stack.url}/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = await client.get(f"{stack.url}/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    r = await client.get(f"{stack.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "tailgate_sse_connections " in r.text


async def test_with_auth_off_every_caller_is_anonymous_and_needs_no_key(
    client: httpx.AsyncClient, make_stack: MakeStack
) -> None:
    open_stack = make_stack(TAILGATE_AUTH="false")
    url = await open_stack.agateway()  # no worker: the stream stays queued until cancelled

    created = await client.post(f"{url}/v1/streams", json={"prompt": "hi"})
    assert created.status_code == 202
    stream = created.json()
    # Any key, or none, is the same anonymous caller.
    r = await client.get(url + stream["status_url"], headers={"Authorization": "Bearer whatever"})
    assert r.status_code == 200 and r.json()["status"] == "queued"
    r = await client.post(url + stream["status_url"] + "/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    _, events = await read_sse(client, url + stream["events_url"])
    assert [e.event for e in events] == ["queued", "cancelled"]


async def test_stream_whose_enqueue_fails_is_taken_back_whole(
    client: httpx.AsyncClient, make_stack: MakeStack
) -> None:
    key = f"tg-shape-{secrets.token_hex(4)}"  # its own owner, so its own active set
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "once"}
    body = {"prompt": "hi"}
    # A queue that answers reads but refuses writes: admission passes, the enqueue fails.
    queue_redis = await RedisServer(extra=["--min-replicas-to-write", "1"]).astart()
    try:
        s = make_stack(TAILGATE_API_KEYS=key)
        url = await s.agateway(TAILGATE_QUEUE_REDIS_URL=queue_redis.url)
        async with Redis.from_url(s.redis_url, decode_responses=True) as r:
            owner = await owner_of(r, key)  # under the owner key the gateway shares through Redis
            streams_before = {k async for k in r.scan_iter("tg:{*")}
            created_before = int(await r.hget(keys.STATS, "created") or 0)

            refused = await client.post(f"{url}/v1/streams", json=body, headers=headers)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "unavailable"
            assert refused.headers["retry-after"] == "1"
            assert {k async for k in r.scan_iter("tg:{*")} == streams_before
            assert int(await r.hget(keys.STATS, "created") or 0) == created_before
            assert await r.zcard(keys.active(owner)) == 0

            # Nothing was left behind, not even the Idempotency-Key: the same request succeeds later.
            async with Redis.from_url(queue_redis.url) as q:
                await q.config_set("min-replicas-to-write", 0)
            accepted = await client.post(f"{url}/v1/streams", json=body, headers=headers)
            assert accepted.status_code == 202
            assert await r.zrange(keys.active(owner), 0, -1) == [accepted.json()["id"]]
            assert int(await r.hget(keys.STATS, "created") or 0) == created_before + 1
    finally:
        await queue_redis.astop()
        queue_redis.close()


async def test_a_queue_on_its_own_redis_runs_streams_whole(
    client: httpx.AsyncClient, make_stack: MakeStack, mock_url: str
) -> None:
    # Not the one-round-trip create: a check of the queue, the create, then the job in a transaction.
    queue_redis = await RedisServer().astart()
    try:
        s = make_stack(TAILGATE_QUEUE_REDIS_URL=queue_redis.url, TAILGATE_MAX_QUEUED="1")
        url = await s.agateway()
        created = await client.post(f"{url}/v1/streams", json={"prompt": "apart"}, headers=s.headers)
        assert created.status_code == 202
        # No worker yet, so the job waits in the queue's own Redis, which is now full.
        async with Redis.from_url(queue_redis.url) as q:
            assert await q.zrange(s.env["TAILGATE_QUEUE_NAME"], 0, -1) == [created.json()["id"].encode()]
        full = await client.post(f"{url}/v1/streams", json={"prompt": "apart"}, headers=s.headers)
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
        await s.aworker()
        _, events = await read_sse(client, url + created.json()["events_url"], headers=s.headers)
        assert [e.event for e in events[:2]] == ["queued", "started"] and events[-1].event == "done"
        assert text_of(events) == await expected_answer(mock_url, "apart")
    finally:
        await queue_redis.astop()
        queue_redis.close()


async def test_no_key_is_a_401_before_the_body_is_looked_at(client: httpx.AsyncClient, stack: Stack) -> None:
    for body in ({"prompt": ""}, {"messages": "not a list", "extra": 1}, {}):
        r = await client.post(f"{stack.url}/v1/streams", json=body)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "unauthorized"
        assert "prompt" not in r.text and "messages" not in r.text
