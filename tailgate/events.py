"""The event codec: how an event is stored in Redis and published to gateways (the gateway's
``sse`` module renders it for each wire format).

A stream entry has two fields, ``t`` (the event type) and ``d`` (its JSON data, which always starts
with ``{"seq":N`` because the append script writes ``seq`` first). Appends publish the same entries as
lines ``<id>\\t<type>\\t<data>``; JSON never holds a raw tab or newline, so no escaping is needed.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

import orjson

TERMINAL = frozenset({"done", "error", "cancelled"})
# The stream status each terminal event leaves behind.
FINAL_STATUS = {"done": "completed", "error": "failed", "cancelled": "cancelled"}
FINISHED = frozenset(FINAL_STATUS.values())

# ASCII digits only (`\d` also matches other scripts' digits, which Redis refuses), whole string
# (`$` would let a trailing newline through); each part at most 2**64 - 1, as Redis's ids are.
_CURSOR_RE = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_ID_MAX = 2**64 - 1
START = "0-0"  # the cursor before the first entry


class CursorError(ValueError):
    """A ``Last-Event-ID`` that is not a cursor this server handed out."""


class Entry(NamedTuple):
    id: str
    type: str
    data: str
    seq: int

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL


def dumps(data: dict[str, Any]) -> str:
    """Compact JSON, non-ASCII as is. orjson takes a tenth of ``json.dumps``'s time; what it refuses
    (an integer past 64 bits, a lone surrogate, both legal in a client's JSON) goes to ``json``."""
    try:
        return orjson.dumps(data).decode()
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def seq_of(data: str) -> int:
    """``seq`` from data the append script wrote: ``{"seq":12,...}`` or ``{"seq":12}``."""
    end = data.find(",", 7)
    return int(data[7 : end if end != -1 else -1])


def entry(entry_id: str, fields: dict[str, str]) -> Entry:
    """An entry as XRANGE returns it."""
    data = fields["d"]
    return Entry(entry_id, fields["t"], data, seq_of(data))


def parse_published(payload: str) -> list[Entry]:
    out = []
    for line in payload.split("\n"):
        entry_id, kind, data = line.split("\t", 2)
        out.append(Entry(entry_id, kind, data, seq_of(data)))
    return out


def parse_cursor(raw: str | None) -> str | None:
    """Validate a client cursor; ``None`` means from the start."""
    if raw is None or raw == "":
        return None
    m = _CURSOR_RE.fullmatch(raw)
    # The largest id is no cursor either: no entry comes after it, and Redis refuses to read past it.
    if (
        m is None
        or int(m[1]) > _ID_MAX
        or int(m[2]) > _ID_MAX
        or (int(m[1]), int(m[2])) == (_ID_MAX, _ID_MAX)
    ):
        raise CursorError(f"malformed cursor {raw[:40]!r}: send back an `id` this stream gave you")
    return raw


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n)
