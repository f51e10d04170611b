"""Every outbound HTTP call of every service goes through aiohttp, opened here.

One factory (`client_session`) gives each caller a pooled session with our rules: the deadlines
it is given (connect, answer), no cookies kept between calls, no automatic decompression and no
headers the caller did not ask for, and a connector that never reuses a kept connection on which
bytes arrived while it sat idle (an upstream that sent more than it announced, or an answer
nobody asked for, would otherwise be read as the next caller's answer). `outbound_error` turns
aiohttp's failures into one small family whose texts never carry a URL.

Measured here (issue 9): aiohttp ~56 µs per sequential GET against a bare server, a hand-written
HTTP/1.1 client 15 µs; the difference is ~2 % of a metered call, far less than the cost of owning
a client's framing and pool-hygiene bugs.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp
import orjson
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.connector import Connection
from aiohttp.tracing import Trace

# Headers aiohttp would add on its own; a caller that wants one sends it.
_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")

FailureKind = Literal["connect", "timeout", "broken"]


class OutboundError(Exception):
    """No (complete) answer could be had. `kind`: "connect" (refused, unreachable, no connection
    in time), "timeout" (connected, but no answer in time) or "broken" (the connection broke or
    the answer was not HTTP). The text never carries the URL."""

    def __init__(self, kind: FailureKind, reason: str) -> None:
        super().__init__(reason)
        self.kind: FailureKind = kind
        self.reason = reason


def outbound_error(exc: BaseException) -> OutboundError:
    """Our error for an aiohttp (or timeout) exception, named by its type only."""
    if isinstance(exc, OutboundError):
        return exc
    if isinstance(exc, aiohttp.ConnectionTimeoutError | aiohttp.ClientConnectorError):
        return OutboundError("connect", type(exc).__name__)
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return OutboundError("timeout", type(exc).__name__)
    return OutboundError("broken", type(exc).__name__)


class _HygienicConnector(aiohttp.TCPConnector):
    """aiohttp closes a connection whose answer left bytes behind when it is released, but bytes
    that arrive later, while the connection is idle in the pool, are parsed and queued for the
    next request on it. Such a connection is closed instead of reused. (Both cases are proved
    against a raw-socket upstream in tests/gateway/test_upstream_client.py, which also shows
    that aiohttp alone still has the second: `_get` is private API, so that test is what tells
    an aiohttp upgrade broke or obsoleted this.)"""

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> Connection | None:
        while True:
            connection = await super()._get(key, traces)
            if connection is None:
                return None
            protocol: ResponseHandler | None = connection.protocol
            if protocol is None or not protocol.should_close:
                return connection
            connection.close()


def client_session(
    *,
    max_connections: int,
    connect_seconds: float,
    total_seconds: float | None = None,
    read_seconds: float | None = None,
    headers: dict[str, str] | None = None,
    keepalive_seconds: float = 15.0,
    base_url: str | None = None,
) -> aiohttp.ClientSession:
    """A pooled session; create it inside the running event loop (a lifespan), close it there.

    `connect_seconds` bounds making a connection, `total_seconds` a whole call (None: the caller
    bounds it), `read_seconds` any wait for the next bytes. Idle connections are closed after
    `keepalive_seconds`, shorter than our servers' own keep-alive (30 s), so a reused connection
    is rarely one the server is closing."""
    connector = _HygienicConnector(
        limit=max_connections,
        limit_per_host=0,
        keepalive_timeout=keepalive_seconds,
        ttl_dns_cache=300,
        enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(
        base_url=base_url,
        connector=connector,
        headers=headers,
        skip_auto_headers=_AUTO_HEADERS,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        raise_for_status=False,
        timeout=aiohttp.ClientTimeout(
            total=total_seconds, sock_connect=connect_seconds, sock_read=read_seconds
        ),
        json_serialize=lambda value: orjson.dumps(value).decode(),
    )


@dataclass(frozen=True, slots=True)
class OutboundResponse:
    status: int
    body: bytes
    headers: dict[str, str] | None = None


async def fetch(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    timeout_seconds: float,
    headers: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    json_body: Any = None,
    max_bytes: int = 4 * 1024 * 1024,
) -> OutboundResponse:
    """One whole call (answer read to its end, at most `max_bytes`) within `timeout_seconds`;
    raises OutboundError."""
    data = None
    if json_body is not None:
        data = orjson.dumps(json_body)
        headers = {**(headers or {}), "content-type": "application/json"}
    try:
        async with (
            asyncio.timeout(timeout_seconds),
            session.request(
                method, url, headers=headers, params=params, data=data, allow_redirects=False
            ) as response,
        ):
            # read(n) answers with what has arrived so far, not the whole body: read to EOF.
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.content.iter_any():
                size += len(chunk)
                if size > max_bytes:
                    raise OutboundError("broken", "answer too large")
                chunks.append(chunk)
            return OutboundResponse(response.status, b"".join(chunks), dict(response.headers))
    except (aiohttp.ClientError, TimeoutError, OutboundError) as exc:
        raise outbound_error(exc) from None


class Outbound(Protocol):
    async def post_json(self, url: str, payload: Any) -> OutboundResponse: ...

    async def aclose(self) -> None: ...


class AiohttpOutbound:
    """JSON POSTs over one pooled session (event push, provider calls); the caller bounds each
    call's time."""

    def __init__(
        self,
        *,
        max_connections: int,
        headers: dict[str, str] | None = None,
        connect_seconds: float = 2.0,
    ) -> None:
        self._session = client_session(
            max_connections=max_connections, connect_seconds=connect_seconds, headers=headers
        )

    async def post_json(self, url: str, payload: Any) -> OutboundResponse:
        try:
            async with self._session.post(
                url,
                data=orjson.dumps(payload),
                headers={"content-type": "application/json"},
                allow_redirects=False,
            ) as response:
                return OutboundResponse(response.status, await response.read())
        except aiohttp.ClientError as exc:
            raise outbound_error(exc) from None

    async def aclose(self) -> None:
        await self._session.close()
