"""Who is asking: API keys (``Authorization: Bearer``) and per-stream read tokens (``?token=``).

A stream belongs to the owner id of the key that created it (``tailgate.apikeys``: a keyed HMAC of
the key, never the key or its bare hash). A read token (``gateway.tokens``) opens its one stream
only while the key that created the stream is valid: revoking the key (``tailgate keys revoke``,
or taking it out of ``TAILGATE_API_KEYS``) closes its tokens too.

Secrets: ``TAILGATE_SECRET`` signs read tokens (and ``TAILGATE_PREVIOUS_SECRETS`` still verify them,
for rotation); ``TAILGATE_OWNER_KEY`` keys owner ids. One left unset is shared through Redis
(``tailgate.apikeys.Secret``; for development). This gateway then reads it again every
``tuning.SHARED_RECHECK_S``, lazily, on the next request that needs it; and at once, though never
more than once per ``tuning.SHARED_REREAD_MIN_S``, when a read token names a key id it does not
know. So replicas converge after the shared secret was lost and created anew: one that meets a
token signed with the new secret follows it at once, the others within seconds. A shared secret this
gateway signed with before it changed still verifies for one token lifetime.
"""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from gateway import tokens
from gateway.errors import ApiError
from gateway.tokens import Keyring, Verdict
from tailgate import apikeys, keys, tuning
from tailgate.apikeys import KeyTable, Secret
from tailgate.settings import Settings

ANONYMOUS = "anonymous"  # the owner of every stream when auth is turned off


class Auth:
    """Checks API keys, signs and checks read tokens; the FastAPI side is ``gateway.dependencies``."""

    def __init__(self, settings: Settings, redis: Redis, secret: Secret, owner_key: Secret) -> None:
        self._enabled = settings.auth
        self._static_keys = settings.static_api_keys
        self._secret = secret
        self._owner_key = owner_key
        self._table = KeyTable(redis, owner_key)
        self._ttl = settings.read_token_ttl_s
        self._previous = [s.encode() for s in settings.previous_secret_list]
        self._retired: dict[bytes, float] = {}  # shared secrets this gateway signed with: until when
        self._read_at = time.monotonic()  # when the shared secrets were last read (monotonic)
        self._reading = asyncio.Lock()
        self._rebuild()

    @classmethod
    async def load(cls, settings: Settings, redis: Redis) -> Auth:
        """The secrets from ``settings``, else shared through Redis (created if no process has)."""
        secret = Secret(settings.secret, redis, keys.SECRET, "TAILGATE_SECRET")
        await secret.load()
        return cls(settings, redis, secret, await apikeys.load_owner_key(settings, redis))

    async def owner(self, api_key: str | None) -> str:
        """The owner id of ``api_key`` (``None``: none was sent), or 401."""
        if not self._enabled:
            return ANONYMOUS
        if not api_key:
            raise ApiError(401, "unauthorized", "send your API key as `Authorization: Bearer <key>`")
        await self._reread(since=time.monotonic() - tuning.SHARED_RECHECK_S)
        owner = self._table.owner(api_key)
        if owner not in self._static and await self._table.admit(api_key) is None:
            raise ApiError(401, "unauthorized", "unknown API key")
        return owner

    def read_token(self, stream_id: str) -> str:
        return self._ring.sign(stream_id, int(time.time()) + self._ttl)

    async def check_token(self, text: str, stream_id: str) -> None:
        """401 ``invalid_token`` unless ``text`` is a read token of ``stream_id``, valid now."""
        arrived = time.monotonic()
        token = tokens.parse(text)
        if token is None:
            raise _invalid(Verdict.MALFORMED)
        since = arrived - tuning.SHARED_RECHECK_S
        if not self._ring.knows(token.kid):
            since = arrived  # another replica may have just made a new shared secret: look first
        await self._reread(since=since)
        longest = self._ttl + tuning.READ_TOKEN_SKEW_S
        verdict = self._ring.check(token, stream_id, now=time.time(), longest_s=longest)
        if verdict is not Verdict.OK:
            raise _invalid(verdict)

    async def check_owner(self, owner: str) -> None:
        """401 ``invalid_token`` unless ``owner`` (a stream's) is the owner id of a valid key."""
        if self._enabled and owner not in self._static and not await self._table.holds(owner):
            raise ApiError(401, "invalid_token", "the API key that created this stream was revoked")

    async def _reread(self, *, since: float) -> None:
        """Make sure the shared secrets were read at ``since`` (monotonic) or later; at most one read
        per ``SHARED_REREAD_MIN_S``, shared by every request waiting for it."""
        if self._read_at >= since or (self._secret.configured and self._owner_key.configured):
            return
        async with self._reading:
            if self._read_at >= since:
                return  # read while we waited
            wait = self._read_at + tuning.SHARED_REREAD_MIN_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._read_at = time.monotonic()
            signed_with = self._secret.value
            if await self._secret.reread():
                self._retired[signed_with] = time.time() + self._ttl + tuning.READ_TOKEN_SKEW_S
            await self._owner_key.reread()
            self._rebuild()

    def _rebuild(self) -> None:
        now = time.time()
        self._retired = {s: until for s, until in self._retired.items() if until > now}
        self._ring = Keyring(self._secret.value, [*self._previous, *self._retired])
        self._static = frozenset(self._table.owner(k) for k in self._static_keys)


def _invalid(verdict: Verdict) -> ApiError:
    return ApiError(401, "invalid_token", verdict.value)
