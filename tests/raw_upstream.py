"""A misbehaving HTTP/1.1 upstream on a raw loopback socket: each accepted connection is handed
to a script the test writes (read the request head, write whatever bytes it likes, stall, close).
For what a well-behaved ASGI server never does: answers longer than announced, answers nobody
asked for, headers trickled byte by byte, bodies delimited by closing the connection."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class RawConnection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    heads: list[bytes] = field(default_factory=list)  # request heads read on this connection

    async def read_head(self) -> bytes:
        """The next request's head (through the blank line) and its Content-Length body;
        b"" when the client closed the connection."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return b""
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length" and int(value.strip()):
                await self.reader.readexactly(int(value.strip()))
        self.heads.append(head)
        return head

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


Script = Callable[[RawConnection], Awaitable[None]]


@dataclass
class RawUpstream:
    url: str
    connections: list[RawConnection]
    closed: list[RawConnection]


def answer(body: bytes, *, status: str = "200 OK", extra: bytes = b"") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


@contextlib.asynccontextmanager
async def raw_upstream(script: Script) -> AsyncIterator[RawUpstream]:
    connections: list[RawConnection] = []
    closed: list[RawConnection] = []
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = RawConnection(reader, writer)
        connections.append(connection)
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await script(connection)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            closed.append(connection)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield RawUpstream(f"http://127.0.0.1:{port}", connections, closed)
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        for task in list(tasks):
            with contextlib.suppress(BaseException):
                await task
        await server.wait_closed()
