"""A TCP proxy in front of the test Redis that a test can switch between three states, to play
a Redis outage without touching the shared Redis server:

- "up": bytes pass both ways;
- "black hole": connections are accepted (new and existing) and nothing is ever answered;
- "down": every connection is cut and new ones are refused (the listening socket is closed and
  opened again on the same port when the proxy comes back up).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
from collections.abc import AsyncIterator
from typing import Any, Literal
from urllib.parse import urlsplit

State = Literal["up", "black hole", "down"]


class RedisProxy:
    def __init__(self, target_host: str, target_port: int, database: str) -> None:
        self._target = (target_host, target_port)
        self._database = database
        self.state: State = "up"
        self._server: asyncio.Server | None = None
        self.port = 0
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}{self._database}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def set(self, state: State) -> None:
        previous, self.state = self.state, state
        if state == "down":
            await self._stop_listening()
            self._cut_everything()
        elif previous == "down":
            await self.start()  # the same port again
        if state == "up" and previous == "black hole":
            # Connections opened during the hole are wedged (their bytes were swallowed):
            # a Redis that "comes back" resets them, as a restarted one would.
            self._cut_everything()

    async def aclose(self) -> None:
        await self._stop_listening()
        self._cut_everything()
        for task in list(self._pipes):
            task.cancel()
        for task in list(self._pipes):
            with contextlib.suppress(BaseException):
                await task

    async def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def _cut_everything(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        if self.state != "up":
            # accepted, never answered (a black hole); cut when the state changes
            await self._swallow(reader)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
            )
        finally:
            self._pipes.discard(task)
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                writer.transport.abort()
                return
            while self.state == "black hole":
                await asyncio.sleep(0.01)  # swallowed: held back, never delivered
                if writer.transport.is_closing():
                    return
            if writer.transport.is_closing():
                return
            writer.write(data)


@contextlib.asynccontextmanager
async def redis_proxy(redis_url: str) -> AsyncIterator[RedisProxy]:
    parts = urlsplit(redis_url)
    proxy = RedisProxy(parts.hostname or "127.0.0.1", parts.port or 6379, parts.path or "/0")
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.aclose()


class ThreadedRedisProxy:
    """A RedisProxy on its own event loop in a thread, for synchronous tests (e2e) whose
    services run in another process."""

    def __init__(self, redis_url: str) -> None:
        import threading

        self._redis_url = redis_url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._proxy: RedisProxy | None = None

    def __enter__(self) -> ThreadedRedisProxy:
        self._thread.start()
        parts = urlsplit(self._redis_url)
        self._proxy = RedisProxy(
            parts.hostname or "127.0.0.1", parts.port or 6379, parts.path or "/0"
        )
        self._run(self._proxy.start())
        return self

    @property
    def url(self) -> str:
        assert self._proxy is not None
        return self._proxy.url

    def set(self, state: State) -> None:
        assert self._proxy is not None
        self._run(self._proxy.set(state))

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    def __exit__(self, *exc: object) -> None:
        assert self._proxy is not None
        self._run(self._proxy.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


# A request in an outage waits at most about one Redis timeout, and once the outage is known
# most decisions are made at once (fail fast) instead of queueing behind a reconnect (issue 9,
# defect 2: four concurrent requests finished after 2, 4, 6 and 8 s). The outage tests assert
# that shape, not a tight bound a loaded machine could break: the median answer within one
# timeout, and none beyond a generous ceiling.
STALL_CEILING_SECONDS = 15.0


def assert_no_stall(seconds: list[float], timeout: float) -> None:
    assert seconds, "no answers during the outage"
    assert statistics.median(seconds) < timeout, sorted(seconds)
    assert max(seconds) < STALL_CEILING_SECONDS, sorted(seconds)
