"""``tailgate top``: the fleet at a glance, read from Redis only, redrawn every ``interval``.

A frame is built from one :class:`Snapshot` (and the one before it, for rates): the queue (the depth
of ARQ's sorted set on the queue Redis, and the age of the oldest stream waiting for its first start,
from the queued index ``tg:queued``: the queue's scores are fair-share times, not clocks), the
running index (``tg:running``: streams running, and those whose heartbeat is older than
``TAILGATE_TAKEOVER_AFTER_S``, awaiting takeover), the counters the store's scripts keep in
``tg:stats``, and the workers' registry (``tg:workers``, which each worker stamps with its running
count on every heartbeat; a worker whose stamp is older than the takeover period is marked silent).
``tokens/s`` is the growth of the ``tokens`` counter between two frames, so the first frame (and
``--once``) has none.

Live, the frame is drawn full-screen with curses; ``q`` or Ctrl-C quits, any other key redraws at
once. ``--once`` prints one frame as plain text. While Redis is unreachable the live view says so
and keeps trying.
"""

from __future__ import annotations

import asyncio
import contextlib
import curses
import json
import sys
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from redis.asyncio import Redis

from tailgate import keys, tuning
from tailgate.connections import REDIS_ERRORS, open_queue, open_store
from tailgate.settings import Settings

# A frame is lines of (text, style) pieces; the curses view maps a style to attributes.
Piece = tuple[str, str]
Line = list[Piece]


@dataclass(frozen=True, slots=True)
class WorkerRow:
    id: str
    host: str
    pid: int
    running: int
    beat_ms: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    at_ms: float
    queued: int
    oldest_ms: float | None  # when the oldest stream waiting for its first start was created
    running: int
    stale: int  # running streams whose heartbeat is older than takeover_after_s: awaiting takeover
    stats: dict[str, int]
    workers: list[WorkerRow]


async def snapshot(queue: Redis, books: Redis, settings: Settings) -> Snapshot:
    """Everything one frame shows: two round trips, one to the queue's Redis and one to the store's
    bookkeeping (``StreamStore.books``; the same Redis, unless the streams are on a cluster)."""
    now = time.time() * 1000
    async with queue.pipeline(transaction=False) as q:
        q.zcard(settings.queue_name)
        q.hgetall(keys.WORKERS)
        depth, registry = await q.execute()
    async with books.pipeline(transaction=False) as s:
        s.zrange(keys.QUEUED, 0, 0, withscores=True)
        s.zcard(keys.RUNNING)
        s.zcount(keys.RUNNING, "-inf", now - settings.takeover_after_s * 1000)
        s.hgetall(keys.STATS)
        oldest, running, stale, stats = await s.execute()
    workers = []
    for worker_id, raw in registry.items():
        info = json.loads(raw)
        if now - info["beat_ms"] < tuning.TOP_FORGET_WORKER_S * 1000:
            row = WorkerRow(_str(worker_id), info["host"], info["pid"], info["running"], info["beat_ms"])
            workers.append(row)
    return Snapshot(
        at_ms=now,
        queued=depth,
        oldest_ms=oldest[0][1] if oldest else None,
        running=running,
        stale=stale,
        stats={_str(k): int(v) for k, v in stats.items()},
        workers=sorted(workers, key=lambda w: w.id),
    )


def _str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _seconds(ms: float) -> str:
    return f"{max(ms, 0.0) / 1000:.1f} s"


def _row(label: str, *pairs: tuple[str, object], style: str = "") -> Line:
    """``label`` then ``name value`` cells, each 22 columns wide (or wider, then 2 spaces apart)."""
    line: Line = [(f"{label:<10}", "label")]
    for name, value in pairs:
        pad = max(22 - len(name) - 1 - len(str(value)), 2)
        line += [(f"{name} ", ""), (str(value), style), (" " * pad, "")]
    return line


def frame(snap: Snapshot, before: Snapshot | None, title: str, takeover_after_s: float) -> list[Line]:
    """One screen. ``before``: the previous snapshot, for ``tokens/s``."""
    st = snap.stats
    oldest = _seconds(snap.at_ms - snap.oldest_ms) if snap.oldest_ms is not None else "-"
    rate = "-"
    if before is not None and snap.at_ms > before.at_ms:
        grown = st.get("tokens", 0) - before.stats.get("tokens", 0)
        rate = f"{grown * 1000 / (snap.at_ms - before.at_ms):.0f}"
    silent = {w.id for w in snap.workers if snap.at_ms - w.beat_ms > takeover_after_s * 1000}
    failures = sorted(
        ((k.removeprefix("failed:"), v) for k, v in st.items() if k.startswith("failed:") and v),
        key=lambda kv: (-kv[1], kv[0]),
    )
    clock = time.strftime("%H:%M:%S", time.gmtime(snap.at_ms / 1000))
    quiet = f"   silent {len(silent)}" if silent else ""
    iw = max([len("worker"), *(len(w.id) for w in snap.workers)]) + 3
    hw = max([len("host"), *(len(w.host) for w in snap.workers)]) + 3
    lines: list[Line] = [
        [(f" {title}   {clock} UTC ", "title")],
        [],
        _row("queue", ("queued", snap.queued), ("oldest", oldest)),
        _row("streams", ("running", snap.running), ("awaiting takeover", snap.stale)),
        _row(
            "finished",
            ("completed", st.get("completed", 0)),
            ("failed", st.get("failed", 0)),
            ("cancelled", st.get("cancelled", 0)),
            ("created", st.get("created", 0)),
        ),
        _row("tokens", ("tokens/s", rate), ("total", st.get("tokens", 0))),
        _row("recovery", ("takeovers", st.get("takeovers", 0)), ("handed back", st.get("handed_back", 0))),
        _row("failures", *failures, style="bad") if failures else _row("failures", ("none", "")),
        [],
        [("workers ", "label"), (str(len(snap.workers)), ""), (quiet, "warn")],
        [(f"{'worker':<{iw}}{'host':<{hw}}{'pid':>8}{'running':>9}   heartbeat", "head")],
    ]
    for w in snap.workers:
        text = f"{w.id:<{iw}}{w.host:<{hw}}{w.pid:>8}{w.running:>9}   {_seconds(snap.at_ms - w.beat_ms)} ago"
        lines.append([(text + ("   silent" if w.id in silent else ""), "warn" if w.id in silent else "")])
    return lines


def plain(lines: list[Line]) -> str:
    return "\n".join("".join(text for text, _ in line).rstrip() for line in lines)


def describe(settings: Settings) -> str:
    """Which Redis the frames come from, without credentials."""

    def where(url: str) -> str:
        u = urlsplit(url)
        hosts = u.netloc.rpartition("@")[2] or "localhost:6379"  # a Sentinel URL may list several
        return ("sentinel " if u.scheme == "redis+sentinel" else "") + hosts + u.path

    streams, queue = where(settings.streams_url), where(settings.queue_url)
    return f"redis {streams}" + (f" (queue {queue})" if queue != streams else "")


async def once(settings: Settings) -> str:
    """``tailgate top --once``: one frame as plain text."""
    queue = open_queue(settings, "top", 1)
    try:
        store = await open_store(settings, "top", 1, wait=False)
        try:
            snap = await snapshot(queue, store.books, settings)
        finally:
            await store.aclose()
    finally:
        await queue.aclose()
    return plain(frame(snap, None, f"tailgate top   {describe(settings)}", settings.takeover_after_s))


def live(settings: Settings, interval: float) -> None:
    """``tailgate top``: full-screen until ``q`` or Ctrl-C; the terminal is restored either way."""
    with contextlib.suppress(KeyboardInterrupt):
        curses.wrapper(lambda screen: asyncio.run(_live(screen, settings, interval)))


async def _live(screen: curses.window, settings: Settings, interval: float) -> None:
    with contextlib.suppress(curses.error):
        curses.curs_set(0)
    screen.nodelay(True)
    styles = _styles()
    title = f"tailgate top   {describe(settings)}   every {interval:g} s   q quits"
    key = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), key.set)
    queue, store = open_queue(settings, "top", 1), None
    before: Snapshot | None = None
    try:
        while True:
            try:
                # Opened once Redis answers: whether it is a cluster decides what to open.
                store = store or await open_store(settings, "top", 1, wait=False)
                snap = await snapshot(queue, store.books, settings)
                lines = frame(snap, before, title, settings.takeover_after_s)
                before = snap
            except REDIS_ERRORS as exc:
                lines = [[(f" {title} ", "title")], [], [(f"Redis unreachable: {exc}; retrying", "bad")]]
            _draw(screen, lines, styles)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await key.wait()
            key.clear()
            while (ch := screen.getch()) != -1:
                if ch in (ord("q"), ord("Q")):
                    return
    finally:
        loop.remove_reader(sys.stdin.fileno())
        await queue.aclose()
        if store is not None:
            await store.aclose()


def _styles() -> dict[str, int]:
    red = yellow = curses.A_BOLD
    if curses.has_colors():
        curses.start_color()
        curses.use_default_colors()
        curses.init_pair(1, curses.COLOR_RED, -1)
        curses.init_pair(2, curses.COLOR_YELLOW, -1)
        curses.init_pair(3, curses.COLOR_CYAN, -1)
        red, yellow = curses.color_pair(1) | curses.A_BOLD, curses.color_pair(2)
        return {
            "title": curses.A_REVERSE | curses.A_BOLD,
            "label": curses.color_pair(3) | curses.A_BOLD,
            "head": curses.A_UNDERLINE,
            "bad": red,
            "warn": yellow,
        }
    return {"title": curses.A_REVERSE, "label": curses.A_BOLD, "head": curses.A_UNDERLINE, "bad": red}


def _draw(screen: curses.window, lines: list[Line], styles: dict[str, int]) -> None:
    height, width = screen.getmaxyx()
    screen.erase()
    for y, line in enumerate(lines[:height]):
        x = 0
        for text, style in line:
            piece = text[: max(width - 1 - x, 0)]  # the last column stays empty: curses errs there
            if piece:
                screen.addstr(y, x, piece, styles.get(style, 0))
            x += len(piece)
    screen.refresh()
