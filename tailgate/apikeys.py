"""API keys and owner ids: one definition for the gateway and ``tailgate keys``, so they always agree.

**Owner ids.** A stream belongs to its key's owner id: HMAC-SHA256 of the key under the *owner key*
(a pepper, ``TAILGATE_OWNER_KEY``), its first 32 hex digits. Owner ids are written all over Redis
(each stream's meta, ``tg:active:<owner>``, ``tg:rate:<owner>``); unlike a bare hash, one read from
there cannot be checked against guessed keys by anyone without the owner key. Keys added with
``tailgate keys add`` live in ``tg:owners`` (owner id → label); keys in ``TAILGATE_API_KEYS`` are never
stored anywhere.

**Secrets from configuration, or shared through Redis.** The owner key and the read-token secret
(``TAILGATE_SECRET``) belong in configuration wherever more than one process runs. Without one,
:class:`Secret` shares a random one through a Redis key, as a development convenience: the first
process creates it (``SET NX``), with a warning; it is never replaced by a newer one; a process that
finds it gone puts its own back, and one that finds another value there follows it, so that
processes converge instead of each keeping its own after the key was lost.

**Keys from older versions.** Before owner ids were keyed, ``tailgate keys add`` stored
``sha256(key) → label`` in ``tg:apikeys``. Such a key keeps working: the first time a gateway sees it,
:meth:`KeyTable.admit` moves it to ``tg:owners`` under its owner id, in one atomic script. Until then
``tailgate keys list`` shows it as legacy, and ``tailgate keys revoke`` removes it from either table.
Streams created before the upgrade belong to the old owner id (the SHA-256 prefix): their key no
longer reaches them (404), they finish and expire as usual, and ``tailgate keys revoke <key>`` cancels
the unfinished ones under both ids. The migration script names two keys outside any hash tag, like
the store's scripts (see ``tailgate.store`` on Redis Cluster).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass

from redis.asyncio import Redis

from tailgate import keys
from tailgate.settings import Settings

log = logging.getLogger(__name__)


def owner_id(owner_key: bytes, api_key: str) -> str:
    """The owner id of ``api_key``: what streams, limits and ``tg:owners`` know the key by."""
    return hmac.new(owner_key, api_key.encode(), hashlib.sha256).hexdigest()[:32]


def legacy_digest(api_key: str) -> str:
    """How versions before keyed owner ids stored a key in ``tg:apikeys`` (and, its first 32 hex
    digits, the owner id of their streams)."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_key() -> str:
    return f"tg-{secrets.token_urlsafe(24)}"


class Secret:
    """A secret from configuration (``configured``, used as is, no Redis involved), or else a random
    one shared through the Redis key ``key`` (see the module docstring). ``setting`` names the
    variable that operators should set, for the log."""

    def __init__(self, configured: str, redis: Redis, key: str, setting: str) -> None:
        self.configured = bool(configured)
        self.value = configured.encode()
        self._redis = redis
        self._key = key
        self._setting = setting

    async def load(self) -> bool:
        """Read the shared secret, creating it if no process has; True if this call created it."""
        if self.configured:
            return False
        created = False
        while True:
            if await self._redis.set(self._key, secrets.token_hex(32), nx=True):
                created = True
            stored = await self._redis.get(self._key)
            if stored is not None:  # else deleted between the two commands: again
                break
        self.value = _bytes(stored)
        how = "created a random one" if created else "using the one"
        log.warning(
            "%s is not set: %s shared through Redis (%s). That is for development: set %s wherever "
            "more than one process runs, as Redis may lose it",
            self._setting,
            how,
            self._key,
            self._setting,
        )
        return created

    async def reread(self) -> bool:
        """Read the shared secret again; True if it changed. If it is gone (a flush, an eviction, a
        restart without persistence), put this process's back, so that nothing changes for the
        processes still holding it; if another process got there first with a new one, follow it."""
        if self.configured:
            return False
        stored = await self._redis.get(self._key)
        if stored is None:
            if await self._redis.set(self._key, self.value, nx=True):
                log.warning(
                    "%s was missing from Redis (flushed, evicted, or restarted without persistence): "
                    "put this process's back. Set %s",
                    self._key,
                    self._setting,
                )
            stored = await self._redis.get(self._key)
            if stored is None:
                return False  # deleted again meanwhile: keep ours, look again next time
        if _bytes(stored) == self.value:
            return False
        log.warning(
            "%s changed in Redis (it was lost and another process created a new one): following it. Set %s",
            self._key,
            self._setting,
        )
        self.value = _bytes(stored)
        return True


async def load_owner_key(settings: Settings, redis: Redis) -> Secret:
    """The owner key: ``TAILGATE_OWNER_KEY``, or the one shared through Redis (``keys.OWNER_KEY``)."""
    owner_key = Secret(settings.owner_key, redis, keys.OWNER_KEY, "TAILGATE_OWNER_KEY")
    if await owner_key.load():
        orphans = await redis.hlen(keys.OWNERS)  # type: ignore[misc]
        if orphans:
            log.error(
                "a new owner key was created, but %s holds %d keys added under the one that was lost: "
                "they match no key any more. Re-add them with `tailgate keys add`, and set "
                "TAILGATE_OWNER_KEY",
                keys.OWNERS,
                orphans,
            )
    return owner_key


async def owner_of(redis: Redis, api_key: str, owner_key: str = "") -> str:
    """The owner id that gateways on ``redis`` with ``TAILGATE_OWNER_KEY=owner_key`` give ``api_key``."""
    return owner_id((await load_owner_key(Settings(owner_key=owner_key), redis)).value, api_key)


# KEYS: tg:owners, tg:apikeys (legacy). ARGV: the owner id, the key's SHA-256.
# 1: a key of tg:owners; 2: a legacy key, moved there now; 0: unknown.
_ADMIT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 1 end
local label = redis.call('HGET', KEYS[2], ARGV[2])
if not label then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], label)
redis.call('HDEL', KEYS[2], ARGV[2])
return 2
"""


@dataclass(frozen=True, slots=True)
class Entry:
    """A key in Redis: its id (owner id; for a legacy key, its SHA-256) and label."""

    id: str
    label: str
    legacy: bool = False


class KeyTable:
    """The keys stored in Redis (``tg:owners``, and the legacy ``tg:apikeys``), under ``owner_key``."""

    def __init__(self, redis: Redis, owner_key: Secret) -> None:
        self._redis = redis
        self._owner_key = owner_key
        self._admit = redis.register_script(_ADMIT)

    def owner(self, api_key: str) -> str:
        return owner_id(self._owner_key.value, api_key)

    async def add(self, label: str) -> str:
        """A new key, stored under its owner id; the key itself is returned, never stored."""
        key = new_key()
        await self._redis.hset(keys.OWNERS, self.owner(key), label)  # type: ignore[misc]
        return key

    async def admit(self, api_key: str) -> str | None:
        """The owner id of ``api_key`` if it is stored (moving a legacy key to ``tg:owners``)."""
        owner = self.owner(api_key)
        found = int(
            await self._admit(keys=[keys.OWNERS, keys.API_KEYS], args=[owner, legacy_digest(api_key)])
        )
        if found == 2:
            log.info("API key %s moved from %s (SHA-256) to %s", owner[:16], keys.API_KEYS, keys.OWNERS)
        return owner if found else None

    async def holds(self, owner: str) -> bool:
        """True if ``owner`` is the owner id of a stored key (not revoked)."""
        return bool(await self._redis.hexists(keys.OWNERS, owner))  # type: ignore[misc]

    async def entries(self) -> list[Entry]:
        owners: dict[str, str] = await self._redis.hgetall(keys.OWNERS)  # type: ignore[misc]
        legacy: dict[str, str] = await self._redis.hgetall(keys.API_KEYS)  # type: ignore[misc]
        out = [Entry(i, label) for i, label in owners.items()]
        out += [Entry(d, label, legacy=True) for d, label in legacy.items()]
        return sorted(out, key=lambda e: (e.legacy, e.id))

    async def remove(self, entry: Entry) -> bool:
        """Take ``entry`` out; False if it was no longer there (a legacy key that was just moved)."""
        table = keys.API_KEYS if entry.legacy else keys.OWNERS
        return bool(await self._redis.hdel(table, entry.id))  # type: ignore[misc]


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
