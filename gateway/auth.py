"""Who is asking: API keys (``Authorization: Bearer``) and per-stream read tokens (``?token=``).

A stream belongs to the key that created it; the owner is stored as a hash of the key, never the key.
Read tokens exist because a browser ``EventSource`` cannot send headers: ``<expiry>.<hmac>`` signed for
one stream id with a secret every replica shares.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

from redis.asyncio import Redis

from gateway.errors import ApiError
from tailgate import keys
from tailgate.settings import Settings

ANONYMOUS = "anonymous"  # the owner of every stream when auth is turned off


class Auth:
    """Checks API keys and signs and checks read tokens; the FastAPI side is ``gateway.dependencies``."""

    def __init__(self, settings: Settings, redis: Redis, secret: bytes) -> None:
        self._enabled = settings.auth
        self._static = frozenset(keys.api_key_hash(k) for k in settings.static_api_keys)
        self._redis = redis
        self._secret = secret
        self._token_ttl = settings.read_token_ttl_s

    @classmethod
    async def load(cls, settings: Settings, redis: Redis) -> Auth:
        """Reads (or, on the first start of the first replica, creates) the shared signing secret."""
        if settings.secret:
            return cls(settings, redis, settings.secret.encode())
        await redis.set(keys.SECRET, secrets.token_hex(32), nx=True)
        secret = await redis.get(keys.SECRET)
        return cls(settings, redis, str(secret).encode())

    async def owner(self, api_key: str | None) -> str:
        """The owner id of ``api_key`` (``None``: none was sent), or 401."""
        if not self._enabled:
            return ANONYMOUS
        if not api_key:
            raise ApiError(401, "unauthorized", "send your API key as `Authorization: Bearer <key>`")
        digest = keys.api_key_hash(api_key)
        if digest not in self._static and not await self._redis.hexists(keys.API_KEYS, digest):  # type: ignore[misc]
            raise ApiError(401, "unauthorized", "unknown API key")
        return digest[:32]

    def read_token(self, stream_id: str) -> str:
        expiry = int(time.time()) + self._token_ttl
        return f"{expiry}.{self._sign(stream_id, expiry)}"

    def token_allows(self, token: str, stream_id: str) -> bool:
        expiry, _, signature = token.partition(".")
        if not expiry.isdigit() or int(expiry) < time.time():
            return False
        return hmac.compare_digest(signature, self._sign(stream_id, int(expiry)))

    def _sign(self, stream_id: str, expiry: int) -> str:
        mac = hmac.new(self._secret, f"{stream_id}.{expiry}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:18]).decode()
