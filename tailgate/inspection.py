"""One stream's life, as ``tailgate inspect`` shows it: read from the stream's own keys only (its meta,
with the attempt history the store's scripts keep in it, and the ends of its event stream), then
rendered as a table for a person or as JSON for a program.

Times are the meta's stamps (the clocks of the gateway and the workers that wrote them), shown in UTC;
timings are differences of them, in milliseconds: ``queue_wait`` (created to the first claim),
``first_token`` (created to the first delta of any attempt) and ``duration`` (created to the end).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from tailgate import keys
from tailgate.events import Entry, entry
from tailgate.store import iso

# The ids the OpenAI surfaces hand out name the same stream.
_PREFIXES = ("chatcmpl-", "resp_")

# How each way an attempt ends reads in the table.
_ENDS = {
    "done": "done",
    "cancelled": "cancelled",
    "error": "error",
    "taken_over": "taken over",
    "handed_back": "handed back",
    "worker_lost": "worker lost, gave up",
}


def stream_id_of(raw: str) -> str | None:
    """The stream id in ``raw`` (a native id, or a ``chatcmpl-``/``resp_`` one), or ``None``."""
    for prefix in _PREFIXES:
        raw = raw.removeprefix(prefix)
    return raw if keys.STREAM_ID_RE.match(raw) else None


@dataclass(frozen=True, slots=True)
class Life:
    """What Redis holds about one stream, read at ``now_ms``."""

    id: str
    meta: dict[str, str]
    attempts: list[dict[str, Any]]  # as the scripts keep them (see tailgate.store)
    events: int
    first: Entry | None
    last: Entry | None
    ttl_s: int  # until the stream's keys expire (-1: no expiry)
    now_ms: float


async def read(redis: Redis, stream_id: str) -> Life | None:
    """The stream's life, or ``None`` if it does not exist (never did, or expired)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.meta(stream_id))
        pipe.xlen(keys.events(stream_id))
        pipe.xrange(keys.events(stream_id), count=1)
        pipe.xrevrange(keys.events(stream_id), count=1)
        pipe.ttl(keys.meta(stream_id))
        meta, count, first, last, ttl = await pipe.execute()
    if not meta:
        return None
    return Life(
        id=stream_id,
        meta=meta,
        attempts=json.loads(meta.get("attempts") or "[]"),
        events=count,
        first=entry(*first[0]) if first else None,
        last=entry(*last[0]) if last else None,
        ttl_s=ttl,
        now_ms=time.time() * 1000,
    )


def _ms(later: str | None, earlier: str | None) -> float | None:
    if not later or not earlier:
        return None
    return round(float(later) - float(earlier), 1)


def _json(raw: str | None) -> Any:
    return json.loads(raw) if raw else None


def _event(e: Entry | None) -> dict[str, Any] | None:
    return None if e is None else {"seq": e.seq, "id": e.id, "type": e.type}


def timings(life: Life) -> dict[str, float | None]:
    m = life.meta
    firsts = [a["first_token_at"] for a in life.attempts if a.get("first_token_at")]
    return {
        "queue_wait": _ms(m.get("started_at"), m.get("created_at")),
        "first_token": _ms(min(firsts, key=float), m.get("created_at")) if firsts else None,
        "duration": _ms(m.get("finished_at"), m.get("created_at")),
    }


def _attempt(a: dict[str, Any]) -> dict[str, Any]:
    return {
        "attempt": a["attempt"],
        "worker": a["worker"],
        "started_at": iso(a["started_at"]),
        "first_token_at": iso(a.get("first_token_at")),
        "ended_at": iso(a.get("ended_at")),
        "reason": a.get("reason"),  # None while it runs
        "code": a.get("code"),
        "last_heartbeat_at": iso(a.get("last_heartbeat_at")) if a.get("last_heartbeat_at") != "0" else None,
        "first_token_ms": _ms(a.get("first_token_at"), a["started_at"]),
        "duration_ms": _ms(a.get("ended_at"), a["started_at"]),
    }


def as_json(life: Life) -> dict[str, Any]:
    """``tailgate inspect --json``."""
    m = life.meta
    return {
        "id": life.id,
        "status": m.get("status"),
        "model": m.get("model"),
        "owner": m.get("owner"),
        "created_at": iso(m.get("created_at")),
        "started_at": iso(m.get("started_at")),
        "finished_at": iso(m.get("finished_at")),
        "timings_ms": timings(life),
        "attempts": [_attempt(a) for a in life.attempts],
        "events": {"count": life.events, "first": _event(life.first), "last": _event(life.last)},
        "usage": _json(m.get("usage")),
        "error": _json(m.get("error")),
        "cancel_requested": m.get("cancel") == "1",
        "expires_in_s": life.ttl_s if life.ttl_s >= 0 else None,
    }


def _clock(ms: str | None) -> str:
    """The time of day (UTC) of a stamp, to the millisecond."""
    at = iso(ms)
    return at[11:23] if at else "-"


def _span(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def _after(ms: float | None) -> str:
    return "-" if ms is None else "+" + _span(ms)


def _end(a: dict[str, Any], life: Life) -> str:
    reason = a.get("reason")
    if reason is None:
        beat = life.meta.get("heartbeat")
        return f"running (heartbeat {_span(_ms(str(life.now_ms), beat))} ago)" if beat else "running"
    out = _ENDS.get(reason, str(reason))
    if a.get("code"):
        out += f" {a['code']}"
    beat = a.get("last_heartbeat_at")
    if beat and beat != "0":
        out += f" (last heartbeat {_clock(beat)})"
    return out


def _finished(m: dict[str, str], duration: float | None) -> str:
    return f"{iso(m['finished_at'])}    after {_span(duration)}" if m.get("finished_at") else "-"


def _waiting(m: dict[str, str]) -> str:
    if m.get("status") == "running" and m.get("release"):
        return " (handed back: waiting for another worker)"
    return ""


def as_text(life: Life) -> str:
    """``tailgate inspect``: the stream's header, then one row per attempt."""
    m, t = life.meta, timings(life)
    owner = m.get("owner", "-")[:16]
    header = [
        ("stream", life.id),
        ("status", f"{m.get('status')}{_waiting(m)}    model {m.get('model') or '-'}    owner {owner}"),
        ("created", iso(m.get("created_at")) or "-"),
        ("started", f"{iso(m.get('started_at')) or '-'}    queued for {_span(t['queue_wait'])}"),
        ("finished", _finished(m, t["duration"])),
        ("first token", f"{_span(t['first_token'])} after creation" if t["first_token"] is not None else "-"),
        ("events", str(life.events)),
    ]
    if life.first is not None and life.last is not None:
        header[-1] = (
            "events",
            f"{life.events}    seq {life.first.seq}-{life.last.seq}    "
            f"ids {life.first.id} .. {life.last.id}    last: {life.last.type}",
        )
    usage, error = _json(m.get("usage")), _json(m.get("error"))
    if usage:
        header.append(("usage", "    ".join(f"{k} {v}" for k, v in usage.items())))
    if error:
        header.append(("error", f"{error.get('code')}: {error.get('message')}"))
    if m.get("cancel") == "1":
        header.append(("cancel", "requested"))
    if life.ttl_s >= 0:
        header.append(("expires", f"in {life.ttl_s} s"))
    rows = [f"{label:<13}{value}" for label, value in header]
    rows.append("")
    table = [("attempt", "worker", "started", "first token", "ended", "ran", "end")]
    for a in life.attempts:
        table.append(
            (
                str(a["attempt"]),
                a["worker"],
                _clock(a["started_at"]),
                _after(_ms(a.get("first_token_at"), a["started_at"])),
                _clock(a.get("ended_at")),
                _span(_ms(a.get("ended_at"), a["started_at"])),
                _end(a, life),
            )
        )
    if len(table) == 1:
        rows.append("no attempts yet")
    else:
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
        rows += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in table]
    return "\n".join(rows)
