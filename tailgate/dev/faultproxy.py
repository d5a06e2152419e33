"""A TCP proxy that can fail on purpose: for fault tests and the chaos soak, on loopback only.

``cut()`` resets every connection through it at once (as a dropped network path does); ``refuse``
makes it reset new connections too until ``accept`` is called; ``lose_reply_to`` lets one request
through and resets its connection when the reply comes back (the client cannot know it ran).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket


class FaultProxy:
    def __init__(self, target_port: int, *, port: int = 0, host: str = "127.0.0.1") -> None:
        self.target_port = target_port
        self.host = host
        self.port = port
        self.refusing = False
        self.lost = 0  # replies lost on purpose so far
        self._marker: bytes | None = None
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut(self) -> int:
        """Reset every open connection; returns how many there were."""
        pairs = list(self._pairs)
        for a, b in pairs:
            _reset(a)
            _reset(b)
        self._pairs.clear()
        return len(pairs)

    def refuse(self) -> None:
        self.refusing = True
        self.cut()

    def accept(self) -> None:
        self.refusing = False

    def lose_reply_to(self, marker: bytes) -> None:
        """The next request containing ``marker`` goes through to the target, which runs it; when its
        reply comes back, that connection is reset both ways instead. One connection carries one
        request at a time (redis-py waits for a reply before it sends the next command on a
        connection, and a pipeline's commands go in one write), so the next reply is that request's."""
        self._marker = marker

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            _reset(writer)
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        doomed = [False]  # the next reply on this connection is lost
        for src, dst, upstream in ((reader, up_writer, True), (up_reader, writer, False)):
            task = asyncio.create_task(self._pipe(src, dst, pair, upstream, doomed))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        upstream: bool,
        doomed: list[bool],
    ) -> None:
        try:
            while data := await src.read(65536):
                if upstream and self._marker is not None and self._marker in data:
                    self._marker, doomed[0] = None, True
                elif not upstream and doomed[0]:
                    self.lost += 1
                    for w in pair:
                        _reset(w)
                    return
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._pairs.discard(pair)
            for w in pair:
                with contextlib.suppress(Exception):
                    w.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN: the peer sees a broken connection, not a polite end."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.close()
