"""Read tokens: ``<key id>.<expiry>.<signature>``, read access to one stream for a browser
``EventSource``, which cannot send headers.

- **key id**: 8 hex digits derived from the secret that signed the token (:func:`key_id`), so that
  rotation needs no configuration beyond the secrets: new tokens are signed with ``TAILGATE_SECRET``;
  those signed with one of ``TAILGATE_PREVIOUS_SECRETS`` stay valid until they expire.
- **expiry**: Unix seconds. A token that expires further ahead than the TTL (plus
  ``tuning.READ_TOKEN_SKEW_S``) is refused whatever its signature: even one forged by someone who
  read the secret lives no longer than a real one.
- **signature**: HMAC-SHA256 of ``<stream id>.<expiry>`` under that secret, its first 144 bits in
  base64url (24 characters).

The parser is strict and ASCII only (``[0-9]``, never ``str.isdigit`` or ``\\d``, which take any
Unicode digit), with a bounded expiry. Nothing here raises, whatever the text: it is a
:class:`ReadToken` or ``None``, and a check is a :class:`Verdict`. This module does no I/O;
``gateway.auth`` knows where the secrets come from.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass

# 10 digits: Unix seconds until the year 2286, and int() of at most 10 ASCII digits cannot fail.
_TOKEN = re.compile(r"([0-9a-f]{8})\.([0-9]{1,10})\.([A-Za-z0-9_-]{24})")


@dataclass(frozen=True, slots=True)
class ReadToken:
    kid: str
    expiry: int
    signature: str

    def __str__(self) -> str:
        return f"{self.kid}.{self.expiry}.{self.signature}"


def parse(text: str) -> ReadToken | None:
    """The token in ``text``, or ``None`` if it is not one (of any shape, in any alphabet)."""
    m = _TOKEN.fullmatch(text)
    if m is None:
        return None
    return ReadToken(m[1], int(m[2]), m[3])


class Verdict(enum.Enum):
    OK = "ok"
    MALFORMED = "the read token is malformed: pass the `read_token` that creating the stream answered"
    UNKNOWN_KEY = "the read token is signed with a key this gateway does not know"
    FORGED = "the read token is not valid for this stream"
    EXPIRED = "the read token has expired"
    TOO_LONG = "the read token expires further ahead than any token this gateway signs"


def key_id(secret: bytes) -> str:
    """The key id of ``secret``: it names the secret in tokens without revealing it."""
    return hmac.new(secret, b"tailgate read-token key id", hashlib.sha256).hexdigest()[:8]


def _signature(secret: bytes, stream_id: str, expiry: int) -> str:
    # surrogatepass: any str encodes, lone surrogates (which a path may decode to) included.
    mac = hmac.new(secret, f"{stream_id}.{expiry}".encode(errors="surrogatepass"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:18]).decode()


class Keyring:
    """Signs with one secret; checks with it and with ``accepted`` (previous secrets)."""

    def __init__(self, signing: bytes, accepted: Iterable[bytes] = ()) -> None:
        self.signing = signing
        self.kid = key_id(signing)
        self._by_kid = {key_id(s): s for s in accepted}
        self._by_kid[self.kid] = signing

    def knows(self, kid: str) -> bool:
        return kid in self._by_kid

    def sign(self, stream_id: str, expiry: int) -> str:
        return str(ReadToken(self.kid, expiry, _signature(self.signing, stream_id, expiry)))

    def check(self, token: ReadToken, stream_id: str, *, now: float, longest_s: float) -> Verdict:
        """Whether ``token`` opens ``stream_id`` at ``now``; one that expires more than ``longest_s``
        after ``now`` does not."""
        secret = self._by_kid.get(token.kid)
        if secret is None:
            return Verdict.UNKNOWN_KEY
        if not hmac.compare_digest(token.signature, _signature(secret, stream_id, token.expiry)):
            return Verdict.FORGED
        if token.expiry < now:
            return Verdict.EXPIRED
        if token.expiry > now + longest_s:
            return Verdict.TOO_LONG
        return Verdict.OK
