"""The gateway's client for one upstream: an aiohttp session (shared/outbound.py) with the
edge's deadlines and a bounded pool.

Deadlines per request: `connect_seconds` to connect; `headers_seconds` from sending until the
answer's headers are in (however slowly they trickle); `answer_seconds` for the whole answer;
`headers_seconds` is also the longest silence while the body streams. At most
`max_connections` requests are in flight to the upstream; a request that finds them all taken
waits `pool_wait_seconds` for one, then gets UpstreamBusy. A slot is taken once and given back
exactly once, whichever way the answer ends (read to its end, abandoned by a client that left,
cut off by a deadline).

The library does the framing (Content-Length, chunked, until close; no body for HEAD, 204,
304), keeps connections alive and discards one whose answer left bytes behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from leaky_tokens.shared.outbound import OutboundError, client_session, outbound_error


class UpstreamBusy(Exception):
    """Every connection to the upstream stayed taken for the pool wait."""


class UpstreamAnswer:
    """Status and raw headers at once; the body as it arrives; the slot back at the end."""

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        slots: asyncio.Semaphore,
        deadline: float,
        silence_seconds: float,
    ) -> None:
        self._response: aiohttp.ClientResponse | None = response
        self._slots = slots
        self._deadline = deadline
        self._silence = silence_seconds
        self.status = response.status
        self.headers: Sequence[tuple[bytes, bytes]] = response.raw_headers

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body; None at its end (the connection then goes back to the
        pool). Raises OutboundError ("timeout", "broken")."""
        response = self._response
        if response is None:
            return None
        content = response.content
        try:
            if content.at_eof():
                chunk = b""  # all of it is in: no wait, so no timer
            else:
                # One timer per wait, for both bounds (the whole answer, the longest silence),
                # rather than aiohttp's sock_read timer re-armed on every packet.
                wait = asyncio.get_running_loop().time() + self._silence
                async with asyncio.timeout_at(min(self._deadline, wait)):
                    chunk = await content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.close()
            raise outbound_error(exc) from None
        if chunk:
            return chunk
        self._finish(response.release)
        return None

    def at_end(self) -> bool:
        """The whole body is in (what is left is buffered): `next_chunk` will not wait."""
        response = self._response
        return response is None or response.content.at_eof()

    def close(self) -> None:
        """Give up on the rest of the answer; the connection is closed, not reused."""
        response = self._response
        if response is not None:
            self._finish(response.close)

    def _finish(self, end: object) -> None:
        self._response = None
        try:
            end()  # type: ignore[operator]
        finally:
            self._slots.release()


class UpstreamClient:
    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int,
        connect_seconds: float,
        headers_seconds: float,
        answer_seconds: float,
        pool_wait_seconds: float,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._base = URL(self.base_url)
        self._max = max_connections
        self._connect = connect_seconds
        self._headers_seconds = headers_seconds
        self._answer_seconds = answer_seconds
        self._pool_wait = pool_wait_seconds
        self._slots = asyncio.Semaphore(max_connections)
        self._session: aiohttp.ClientSession | None = None

    @property
    def free_slots(self) -> int:
        return self._slots._value  # (for tests and health: how many requests could start now)

    def _open(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop.
        self._session = client_session(
            # One more than our slots: a connection aiohttp is still closing never makes a
            # request that holds a slot wait.
            max_connections=self._max + 1,
            connect_seconds=self._connect,
            read_seconds=None,  # bounded per wait by us (UpstreamAnswer.next_chunk)
        )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> UpstreamAnswer:
        """Send the request; return once the answer's headers are in. `target`: the raw
        (still percent-encoded) path and query. Raises UpstreamBusy or OutboundError; an error
        raised by a streamed `body` propagates as itself."""
        await self._take_slot()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._answer_seconds
        session = self._session or self._open()
        url = self._base.with_path(target, encoded=True) if "?" not in target else None
        if url is None:
            path, _, query = target.partition("?")
            url = self._base.with_path(path, encoded=True).with_query(None)
            url = URL(str(url) + "?" + query, encoded=True)
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + self._headers_seconds)):
                response = await session.request(
                    method,
                    url,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    compress=None,
                )
        except BaseException as exc:
            self._slots.release()
            if isinstance(exc, aiohttp.ClientError | TimeoutError):
                raise outbound_error(exc) from None
            raise
        return UpstreamAnswer(response, self._slots, deadline, self._headers_seconds)

    async def _take_slot(self) -> None:
        slots = self._slots
        if not slots.locked():
            await slots.acquire()  # a free slot: returns without suspending
            return
        try:
            async with asyncio.timeout(self._pool_wait):
                await slots.acquire()
        except TimeoutError:
            raise UpstreamBusy() from None


__all__ = ["OutboundError", "UpstreamAnswer", "UpstreamBusy", "UpstreamClient"]
