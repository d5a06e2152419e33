"""Read tokens and keys: any malformed token is a clean 401; a token lives no longer than the TTL
whoever signed it; secrets rotate through key ids; replicas that shared a secret through Redis
converge after it was lost and made anew; revoking a key refuses its tokens and cancels its
streams; owners are a keyed HMAC of the key, and keys from older versions keep working."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from gateway.auth import Auth
from gateway.errors import ApiError
from gateway.tokens import Keyring, Verdict, key_id, parse
from tailgate import keys, tuning
from tailgate.apikeys import Secret, legacy_digest, owner_of
from tailgate.dev.procs import RedisServer, arun, await_until, tailgate_command
from tailgate.dev.sse import read_sse
from tailgate.settings import Settings
from tests.conftest import API_KEY
from tests.harness import MakeStack, Stack, mock_requests

SECRET = "rotation-secret-one-0123456789abcdef"
NEW_SECRET = "rotation-secret-two-0123456789abcdef"
TTL_S = 3600  # the default TAILGATE_READ_TOKEN_TTL_S


def forge(secret: str, stream_id: str, expiry: int) -> str:
    """A token as anyone who knows ``secret`` can make one."""
    return Keyring(secret.encode()).sign(stream_id, expiry)


def error_code(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"]
    return str(body["error"]["code"])


async def create(client: httpx.AsyncClient, url: str, key: str, prompt: str = "hi") -> dict[str, str]:
    r = await client.post(
        f"{url}/v1/streams", json={"prompt": prompt}, headers={"Authorization": f"Bearer {key}"}
    )
    assert r.status_code == 202, r.text
    created: dict[str, str] = r.json()
    return created


async def read_with(
    client: httpx.AsyncClient, url: str, created: dict[str, str], token: str
) -> httpx.Response:
    """Open the stream's events with ``token``; the response (the first event read, if it opened)."""
    response, _ = await read_sse(client, url + created["events_url"], params={"token": token}, limit=1)
    return response


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    """A Redis of this test's own: the shared secrets in it are this test's to lose."""
    server = await RedisServer().astart()
    yield server
    server.close()


# --- Finding 6: malformed tokens ---------------------------------------------------------------


def nearly_tokens() -> st.SearchStrategy[str]:
    """Texts shaped like tokens, from parts that are often almost right: Unicode digits, long or
    negative expiries, non-ASCII signatures, missing or extra parts."""
    kid = st.one_of(
        st.just(key_id(SECRET.encode())),  # the key id of the secret the tests below check with
        st.from_regex(r"[0-9a-f]{8}", fullmatch=True),
        st.text(max_size=10),
    )
    digits = st.sampled_from("0123456789²³¹٣۴१߂٠１")  # Unicode digits pass str.isdigit()
    expiry = st.one_of(
        st.integers(min_value=-(10**12), max_value=10**12).map(str),
        st.text(digits, min_size=1, max_size=12),
        st.just("9" * 5000),
    )
    sig = st.one_of(st.from_regex(r"[A-Za-z0-9_-]{24}", fullmatch=True), st.text(min_size=20, max_size=28))
    parts = st.lists(st.one_of(kid, expiry, sig), min_size=1, max_size=4)
    return st.one_of(st.tuples(kid, expiry, sig).map(".".join), parts.map(".".join))


@given(st.one_of(st.text(), nearly_tokens()))
def test_token_parser_answers_any_text_with_a_clean_refusal_or_that_very_token(text: str) -> None:
    token = parse(text)
    if token is None:
        return
    assert str(token) == text  # nothing was read into the token that the text does not say
    assert text.isascii()
    assert 0 <= token.expiry < 10**10
    # And checking it answers a verdict, whatever the token says: it never raises.
    verdict = Keyring(SECRET.encode()).check(token, "0" * 32, now=time.time(), longest_s=TTL_S)
    assert verdict in Verdict


@given(text=st.one_of(st.text(), nearly_tokens()), stream_id=st.text())
async def test_any_token_text_is_accepted_or_refused_with_401_invalid_token(
    text: str, stream_id: str
) -> None:
    settings = Settings(secret=SECRET, owner_key="o" * 32, api_keys="")
    redis = Redis.from_url("redis://127.0.0.1:1")  # configured secrets: never asked
    auth = Auth(settings, redis, Secret(SECRET, redis, keys.SECRET, ""), Secret("o" * 32, redis, "", ""))
    try:
        await auth.check_token(text, stream_id)
    except ApiError as exc:
        assert (exc.status, exc.code) == (401, "invalid_token")
    else:
        token = parse(text)
        assert token is not None and text == forge(SECRET, stream_id, token.expiry)
    finally:
        await redis.aclose()


@given(stream_id=st.text(), ahead=st.integers(min_value=0, max_value=TTL_S))
def test_a_token_opens_its_stream_and_no_other(stream_id: str, ahead: int) -> None:
    ring = Keyring(SECRET.encode())
    now = time.time()
    token = parse(ring.sign(stream_id, int(now) + ahead))
    assert token is not None
    assert ring.check(token, stream_id, now=int(now), longest_s=TTL_S) is Verdict.OK
    assert ring.check(token, stream_id + "0", now=int(now), longest_s=TTL_S) is Verdict.FORGED


def with_part(token: str, i: int, part: str) -> str:
    """``token`` with its part ``i`` (0: key id, 1: expiry, 2: signature) replaced."""
    parts = token.split(".")
    parts[i] = part
    return ".".join(parts)


def sig(token: str) -> str:
    return token.split(".")[2]


# Each turns the stream's real token into a malformed one; first the inputs of issue #9 (the old
# format, `<expiry>.<signature>`), each once a 500, then the same faults in the current format.
MALFORMED: dict[str, Callable[[str], str]] = {
    "old format, unicode digit": lambda t: "².x",  # int('²') once str.isdigit() said yes
    "old format, 5000 digits": lambda t: "9" * 5000 + ".x",  # past Python's int-string limit
    # hmac.compare_digest raises TypeError on a non-ASCII str
    "old format, non-ascii signature": lambda t: with_part(t, 2, "é" + sig(t)[1:]).split(".", 1)[1],
    "unicode digits": lambda t: with_part(t, 1, "²²²²²"),
    "5000 digits": lambda t: with_part(t, 1, "9" * 5000),
    "non-ascii signature": lambda t: with_part(t, 2, "é" + sig(t)[1:]),
    "fullwidth key id": lambda t: t.translate({ord(c): ord(c) + 0xFEE0 for c in "0123456789"}),
    "trailing newline": lambda t: t + "\n",
    "negative expiry": lambda t: with_part(t, 1, "-" + t.split(".")[1]),
    "empty": lambda t: "",
    "dots": lambda t: "..",
    "nul": lambda t: "\x00",
}


@pytest.mark.parametrize("malform", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_read_token_is_401_invalid_token_never_500(
    client: httpx.AsyncClient, stack: Stack, malform: Callable[[str], str]
) -> None:
    created = await create(client, stack.url, API_KEY, "hi [mock:tokens=1]")
    token = malform(created["read_token"])
    assert token != created["read_token"]
    r = await read_with(client, stack.url, created, token)
    assert r.status_code == 401
    assert error_code(r) == "invalid_token"
    assert r.json()["error"]["message"] == Verdict.MALFORMED.value


# --- Finding 7: secrets, expiry, rotation, convergence -------------------------------------------


async def test_token_expiring_further_ahead_than_the_ttl_is_refused_even_if_signed(
    client: httpx.AsyncClient, make_stack: MakeStack
) -> None:
    s = make_stack(TAILGATE_SECRET=SECRET)
    url = await s.agateway()  # no worker: streams stay queued, a reader gets `queued` and stops
    created = await create(client, url, API_KEY)
    now = int(time.time())

    assert (
        await read_with(client, url, created, forge(SECRET, created["id"], now + TTL_S))
    ).status_code == 200
    # Someone who read the secret (from Redis, say) cannot make a token that outlives the TTL.
    for expiry in (now + 10 * 365 * 86400, now + TTL_S + tuning.READ_TOKEN_SKEW_S + 30, 9_999_999_999):
        r = await read_with(client, url, created, forge(SECRET, created["id"], expiry))
        assert r.status_code == 401, expiry
        assert error_code(r) == "invalid_token"
        assert "further ahead" in r.json()["error"]["message"]
    r = await read_with(client, url, created, forge(SECRET, created["id"], now - 5))
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]


async def test_previous_secret_still_verifies_during_rotation_and_new_tokens_use_the_new_one(
    client: httpx.AsyncClient, make_stack: MakeStack
) -> None:
    s = make_stack()
    old = await s.agateway(TAILGATE_SECRET=SECRET)
    rotated = await s.agateway(TAILGATE_SECRET=NEW_SECRET, TAILGATE_PREVIOUS_SECRETS=f"unused,{SECRET}")
    after = await s.agateway(TAILGATE_SECRET=NEW_SECRET)  # once the overlap is over
    before = await create(client, old, API_KEY)
    since = await create(client, rotated, API_KEY)

    assert before["read_token"].startswith(key_id(SECRET.encode()) + ".")
    assert since["read_token"].startswith(key_id(NEW_SECRET.encode()) + ".")
    assert (await read_with(client, rotated, before, before["read_token"])).status_code == 200
    assert (await read_with(client, rotated, since, since["read_token"])).status_code == 200
    assert (await read_with(client, after, since, since["read_token"])).status_code == 200
    r = await read_with(client, after, before, before["read_token"])
    assert r.status_code == 401 and error_code(r) == "invalid_token"


async def test_token_of_an_unknown_key_id_is_refused_after_one_rate_limited_look_at_redis(
    client: httpx.AsyncClient, make_stack: MakeStack, own_redis: RedisServer
) -> None:
    s = make_stack(redis_url=own_redis.url)  # no TAILGATE_SECRET: shared through Redis
    url = await s.agateway()
    created = await create(client, url, API_KEY)
    forged = forge("a secret of the attacker's own", created["id"], int(time.time()) + 60)

    async with Redis.from_url(own_redis.url) as r:
        gets_before = (await r.info("commandstats"))["cmdstat_get"]["calls"]
        answers = await asyncio.gather(*[read_with(client, url, created, forged) for _ in range(40)])
        gets = (await r.info("commandstats"))["cmdstat_get"]["calls"] - gets_before

        # A key id names the secret to check with; no other secret stands in for an unknown one,
        # not even the right one.
        real = await r.get(keys.SECRET)
        renamed = with_part(forge(real.decode(), created["id"], int(time.time()) + 60), 0, "0badc0de")
        refused = await read_with(client, url, created, renamed)

    assert {a.status_code for a in answers} == {401}
    assert {a.json()["error"]["message"] for a in answers} == {Verdict.UNKNOWN_KEY.value}
    # Each re-read is two GETs (secret, owner key); 40 forged tokens at once cost at most two of them.
    assert 2 <= gets <= 4, gets
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == Verdict.UNKNOWN_KEY.value
    assert (await read_with(client, url, created, created["read_token"])).status_code == 200


async def test_replicas_converge_after_the_shared_secrets_are_lost_and_made_anew(
    client: httpx.AsyncClient, make_stack: MakeStack, own_redis: RedisServer
) -> None:
    s = make_stack(redis_url=own_redis.url)  # neither TAILGATE_SECRET nor TAILGATE_OWNER_KEY
    one, two = await s.agateway(), await s.agateway()
    first = await create(client, one, API_KEY)
    assert (await read_with(client, two, first, first["read_token"])).status_code == 200
    await s.procs[0].await_log("TAILGATE_SECRET is not set")
    await s.procs[0].await_log("TAILGATE_OWNER_KEY is not set")

    # The shared secrets are lost (evicted, say); a replica that starts now makes new ones.
    async with Redis.from_url(own_redis.url, decode_responses=True) as r:
        lost = await r.get(keys.SECRET)
        await r.delete(keys.SECRET, keys.OWNER_KEY)
        three = await s.agateway()
        assert await r.get(keys.SECRET) not in (None, lost)
    await s.procs[2].await_log("created a random one")
    new = await create(client, three, API_KEY)

    # Replica one meets a token signed with the new secret: it looks at Redis and follows it.
    assert (await read_with(client, one, new, new["read_token"])).status_code == 200
    # From now on its tokens and owner ids are the new replica's.
    later = await create(client, one, API_KEY)
    assert (await read_with(client, three, later, later["read_token"])).status_code == 200
    status = await client.get(f"{three}/v1/streams/{later['id']}", headers=s.headers)
    assert status.status_code == 200

    # Replica two meets no such token: it follows within seconds all the same.
    async def two_converged() -> bool:
        made = await create(client, two, API_KEY)
        return (await read_with(client, three, made, made["read_token"])).status_code == 200

    await await_until(
        two_converged, "replica two signing with the new secret", within=3 * tuning.SHARED_RECHECK_S
    )


async def test_a_replica_puts_back_the_shared_secret_it_finds_missing(
    client: httpx.AsyncClient, make_stack: MakeStack, own_redis: RedisServer
) -> None:
    s = make_stack(redis_url=own_redis.url)
    url = await s.agateway()
    created = await create(client, url, API_KEY)
    async with Redis.from_url(own_redis.url, decode_responses=True) as r:
        held = await r.get(keys.SECRET)
        await r.delete(keys.SECRET)
        # A token of an unknown key id makes the replica look: it finds the secret gone, puts its own back.
        forged = forge("another", created["id"], int(time.time()) + 60)
        assert (await read_with(client, url, created, forged)).status_code == 401
        assert await r.get(keys.SECRET) == held
    assert (await read_with(client, url, created, created["read_token"])).status_code == 200


# --- Finding 7: revocation ---------------------------------------------------------------------


async def keys_cli(stack: Stack, *args: str) -> str:
    done = await arun(tailgate_command("keys", *args), stack.env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def test_read_token_of_a_revoked_key_is_refused(client: httpx.AsyncClient, stack: Stack) -> None:
    key = await keys_cli(stack, "add", "to-revoke")
    created = await create(client, stack.url, key, "hi [mock:tokens=2]")
    response, events = await read_sse(
        client, stack.url + created["events_url"], params={"token": created["read_token"]}
    )
    assert response.status_code == 200 and events[-1].event == "done"

    await keys_cli(stack, "revoke", key)

    r = await read_with(client, stack.url, created, created["read_token"])
    assert r.status_code == 401
    assert error_code(r) == "invalid_token"
    assert "revoked" in r.json()["error"]["message"]
    r = await client.get(stack.url + created["status_url"], headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 401


async def test_revoke_cancels_the_keys_running_and_queued_streams(
    client: httpx.AsyncClient, make_stack: MakeStack, mock_url: str, prompt: str
) -> None:
    s = make_stack(TAILGATE_CONCURRENCY="1")  # the second stream waits in the queue
    url = await s.agateway()
    await s.aworker()
    key = await keys_cli(s, "add", "busy")
    prompt += " [mock:tokens=400,delay_ms=10]"
    running = await create(client, url, key, prompt)
    reader = asyncio.create_task(
        read_sse(client, url + running["events_url"], params={"token": running["read_token"]})
    )
    async with Redis.from_url(s.redis_url, decode_responses=True) as r:
        await await_until(lambda: _status(r, running["id"], "running"), "the first stream running", within=10)
        queued = await create(client, url, key, "hi")
        assert await r.hget(keys.meta(queued["id"]), "status") == "queued"
        cancels = r.pubsub()
        await cancels.subscribe(keys.CANCEL_CHANNEL)

        said = await keys_cli(s, "revoke", key)

        assert "cancelled 2 unfinished streams" in said
        assert await _announced(cancels, running["id"])
        await cancels.aclose()
        _, events = await asyncio.wait_for(reader, 30)
        assert events[-1].event == "cancelled"
        assert len([e for e in events if e.event == "delta"]) < 400
        assert await r.hget(keys.meta(queued["id"]), "status") == "cancelled"
        await await_until(lambda: _status(r, running["id"], "cancelled"), "the first stream cancelled")
        owner = await owner_of(r, key)
        assert await r.zcard(keys.active(owner)) == 0
    [served] = await mock_requests(mock_url, prompt)
    assert served["closed_early"] is True


async def _status(r: Redis, stream_id: str, status: str) -> bool:
    return bool(await r.hget(keys.meta(stream_id), "status") == status)  # type: ignore[misc]


async def _announced(pubsub: PubSub, stream_id: str) -> bool:
    """True once ``stream_id`` is published on the cancel channel (within 10 s)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        if msg is not None and msg["data"] == stream_id:
            return True
    return False


async def test_revoking_a_key_from_the_environment_says_where_it_lives(stack: Stack) -> None:
    done = await arun(tailgate_command("keys", "revoke", API_KEY), stack.env)
    assert done.returncode != 0
    assert "TAILGATE_API_KEYS" in done.stderr


# --- Finding 7: owner ids ------------------------------------------------------------------------


async def test_owner_is_a_keyed_hmac_of_the_key_and_the_cli_agrees_with_the_gateway(
    client: httpx.AsyncClient, make_stack: MakeStack
) -> None:
    owner_key = secrets.token_hex(16)
    s = make_stack(TAILGATE_OWNER_KEY=owner_key)
    url = await s.agateway()
    added = await keys_cli(s, "add", "peppered")
    for key in (API_KEY, added):
        created = await create(client, url, key)
        async with Redis.from_url(s.redis_url, decode_responses=True) as r:
            stored = await r.hget(keys.meta(created["id"]), "owner")
        expected = hmac.new(owner_key.encode(), key.encode(), hashlib.sha256).hexdigest()[:32]
        assert stored == expected
        assert stored != hashlib.sha256(key.encode()).hexdigest()[:32]
    listed = await keys_cli(s, "list")
    static_owner = hmac.new(owner_key.encode(), API_KEY.encode(), hashlib.sha256).hexdigest()
    assert f"{static_owner[:16]}  (TAILGATE_API_KEYS)" in listed
    added_owner = hmac.new(owner_key.encode(), added.encode(), hashlib.sha256).hexdigest()
    assert f"{added_owner[:16]}  peppered" in listed


async def test_key_stored_by_an_older_version_works_and_moves_to_its_owner_id(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    key = f"tg-old-{secrets.token_hex(8)}"
    async with Redis.from_url(stack.redis_url, decode_responses=True) as r:
        await r.hset(keys.API_KEYS, hashlib.sha256(key.encode()).hexdigest(), "from v0.1")
        assert "(legacy" in await keys_cli(stack, "list")

        created = await create(client, stack.url, key, "hi [mock:tokens=1]")

        owner = await owner_of(r, key)
        assert await r.hget(keys.meta(created["id"]), "owner") == owner
        assert not await r.hexists(keys.API_KEYS, legacy_digest(key))
        assert await r.hget(keys.OWNERS, owner) == "from v0.1"
    assert f"{owner[:16]}  from v0.1" in await keys_cli(stack, "list")
    assert "revoked" in await keys_cli(stack, "revoke", key)
    r2 = await client.post(
        f"{stack.url}/v1/streams", json={"prompt": "hi"}, headers={"Authorization": f"Bearer {key}"}
    )
    assert r2.status_code == 401
