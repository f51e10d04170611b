"""Forwarding one request to its upstream and streaming the answer back, behind the upstream's
circuit breaker: one aiohttp pool per upstream (upstream.py), hop-by-hop and identity headers
stripped, X-Forwarded-For / X-Request-Id set by us.

Request bodies: one of unknown length (chunked) or of at most `_BUFFER_BYTES` is read whole
before anything goes upstream, so a body over the size limit or a client that stops sending is
refused (413, 408) without the upstream ever seeing a truncated request, and a slow client
never holds an upstream connection; a longer body of announced length streams as it arrives.

What counts against an upstream's breaker: refused or reset connections, timeouts and 503
answers marked as the upstream's own outage (`X-Service-Outage`, shared/errors.py). Every answer
the upstream gives (a 402, a 429, a 502 from the token service, a business 503 such as
PURCHASES_DISABLED) passes through unchanged; only failures to get an answer become gateway
errors. A redirect to the upstream's own address is rewritten to a path, so internal URLs never
reach clients.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Sequence

from multidict import CIMultiDict
from starlette.types import Receive, Scope, Send

from leaky_tokens.gateway.upstream import (
    OutboundError,
    UpstreamAnswer,
    UpstreamBusy,
    UpstreamClient,
)
from leaky_tokens.shared.circuit_breaker import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
)
from leaky_tokens.shared.clock import Clock
from leaky_tokens.shared.errors import OUTAGE_HEADER
from leaky_tokens.shared.http import SECURITY_HEADERS

log = logging.getLogger("leaky_tokens.gateway")

# The names the plan's fallback body uses for each upstream.
SERVICE_NAMES: dict[str, str] = {
    "auth": "auth-server",
    "tokens": "token-service",
    "analytics": "analytics-service",
    "qwen": "qwen-stub",
    "gemini": "gemini-stub",
    "openai": "openai-stub",
}

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Request headers never passed on: hop-by-hop, what we set ourselves, and anything a
# client could use to claim an identity or an address. Upstreams verify the caller's own
# Authorization / X-Api-Key and trust nothing else.
_DROP_REQUEST = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"x-request-id",
    b"forwarded",
    b"x-forwarded-for",
    b"x-forwarded-host",
    b"x-forwarded-proto",
    b"x-forwarded-port",
    b"x-forwarded-prefix",
    b"x-forwarded-user",
    b"x-real-ip",
    b"x-client-ip",
    b"x-user-id",
    b"x-username",
    b"x-roles",
    b"x-org-ids",
    b"x-api-key-id",
    b"x-principal",
    b"x-remote-user",
    b"remote-user",
}
_DROP_REQUEST_PREFIXES = (b"x-authenticated-", b"x-auth-", b"x-user-", b"x-principal-")
_OUTAGE = OUTAGE_HEADER.lower().encode()
# Response headers the gateway's own envelope sets (once) on every answer, and internal ones.
_DROP_RESPONSE = HOP_BY_HOP | {
    b"x-request-id",
    b"date",
    b"server",
    _OUTAGE,
    *(name for name, _ in SECURITY_HEADERS),
}
_NO_BODY_STATUSES = frozenset({204, 304})
_BUFFER_BYTES = 64 * 1024  # request bodies up to this are read whole before going upstream


def request_is_dropped(name: bytes) -> bool:
    return name in _DROP_REQUEST or name.startswith(_DROP_REQUEST_PREFIXES)


class UpstreamUnreachable(Exception):
    """No connection, or it broke before an answer came."""


class UpstreamTimeout(Exception):
    """The upstream did not answer in time."""


class UpstreamBrokeOff(Exception):
    """The upstream's answer started but could not be read to its end."""


class UpstreamOpen(Exception):
    """The upstream's breaker is open: not even tried."""

    def __init__(self, retry_after_seconds: float) -> None:
        self.retry_after_seconds = retry_after_seconds


class UpstreamSaturated(Exception):
    """Every connection to the upstream stayed busy for the pool wait: not tried."""


class ClientWentAway(Exception):
    """The client disconnected while its request body was on its way."""


class ClientTooSlow(Exception):
    """The client's request body did not arrive within the body deadline (408)."""


class _Outage503(Exception):
    """A 503 the upstream marked as its own outage: passed on unchanged, counted as a failure."""

    def __init__(self, answer: UpstreamAnswer) -> None:
        self.answer = answer


class _StreamedBody:
    """A body of announced length, read from the client as the upstream takes it."""

    def __init__(self, receive: Receive, first: bytes, deadline: float) -> None:
        self.receive = receive
        self.first = first
        self.deadline = deadline
        self.error: BaseException | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        if self.first:
            yield self.first
        while True:
            try:
                async with asyncio.timeout_at(self.deadline):
                    message = await self.receive()
            except TimeoutError:
                self.error = ClientTooSlow()
                raise self.error from None
            except Exception as exc:  # e.g. the body grew past the size limit
                self.error = exc
                raise
            if message["type"] == "http.disconnect":
                self.error = ClientWentAway()
                raise self.error
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return


async def _read_whole(receive: Receive, first: bytes, deadline: float) -> bytes:
    parts = [first]
    try:
        async with asyncio.timeout_at(deadline):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientWentAway()
                parts.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise ClientTooSlow() from None
    return b"".join(parts)


class Upstream:
    """One upstream service: where it is, its connection pool and its circuit breaker."""

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        breaker: BreakerConfig,
        clock: Clock,
        connect_seconds: float,
        headers_seconds: float,
        answer_seconds: float,
        pool_wait_seconds: float,
        client_body_seconds: float,
        max_connections: int,
        internal_origins: Iterable[str] = (),
    ) -> None:
        self.name = name
        self.service_name = SERVICE_NAMES.get(name, name)
        self.client = UpstreamClient(
            base_url,
            max_connections=max_connections,
            connect_seconds=connect_seconds,
            headers_seconds=headers_seconds,
            answer_seconds=answer_seconds,
            pool_wait_seconds=pool_wait_seconds,
        )
        self.base_url = self.client.base_url
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"upstream {name}: {base_url!r} is not an http(s) URL")
        self._prefix = self.base_url.split("/", 3)[3] if self.base_url.count("/") >= 3 else ""
        self._client_body_seconds = client_body_seconds
        origins = {_origin(self.base_url), *(_origin(o) for o in internal_origins)}
        self._internal_origins = tuple(o.encode() for o in origins if o)
        self.breaker = CircuitBreaker(name, breaker, clock, on_state_change=_log_transition)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: Sequence[tuple[bytes, bytes]],
        extra_headers: Iterable[tuple[bytes, bytes]],
        content_length: int | None,
    ) -> None:
        """Send the request upstream and stream the answer to the client, adding
        `extra_headers` (rate-limit fields; X-RateLimit-* only where the upstream set none).
        `content_length`: the client's, None for a chunked body or none."""
        method: str = scope["method"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        target = (f"/{self._prefix}" if self._prefix else "") + raw_path.decode("latin-1")
        query: bytes = scope["query_string"]
        if query:
            target += "?" + query.decode("latin-1")

        loop = asyncio.get_running_loop()
        body_deadline = loop.time() + self._client_body_seconds
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientWentAway()
        first = message.get("body", b"")
        body: bytes | AsyncIterator[bytes] | None
        streamed: _StreamedBody | None = None
        if not message.get("more_body", False):
            body = first if (first or content_length is not None) else None
        elif content_length is None or content_length <= _BUFFER_BYTES:
            body = await _read_whole(receive, first, body_deadline)
        else:
            streamed = _StreamedBody(receive, first, body_deadline)
            body = streamed.chunks()

        outgoing: CIMultiDict[str] = CIMultiDict(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in headers
        )
        if streamed is not None:
            # Announced, so the library sends the body as it is (not chunked).
            outgoing["Content-Length"] = str(content_length)
        client = self.client

        async def answer() -> UpstreamAnswer:
            try:
                got = await client.request(method, target, outgoing, body)
            except UpstreamBusy:
                raise UpstreamSaturated() from None
            except OutboundError as exc:
                if streamed is not None and streamed.error is not None:
                    raise streamed.error from None  # the client's doing, not the upstream's
                if exc.kind == "timeout":
                    raise UpstreamTimeout() from None
                raise UpstreamUnreachable(exc.reason) from None
            if got.status == 503 and _marks_outage(got.headers):
                raise _Outage503(got)
            return got

        try:
            got = await self.breaker.call(answer, _is_upstream_failure)
        except CircuitOpenError as exc:
            raise UpstreamOpen(exc.retry_after_seconds) from None
        except _Outage503 as outage:
            got = outage.answer
        try:
            await self._relay(got, receive, send, extra_headers)
        finally:
            got.close()

    async def _relay(
        self,
        answer: UpstreamAnswer,
        receive: Receive,
        send: Send,
        extra_headers: Iterable[tuple[bytes, bytes]],
    ) -> None:
        status = answer.status
        headers: list[tuple[bytes, bytes]] = []
        upstream_limits = False
        for name, value in answer.headers:
            lowered = name.lower()
            if lowered in _DROP_RESPONSE:
                continue
            if status in _NO_BODY_STATUSES and lowered == b"content-length":
                continue  # no body follows; a length would make the server expect one
            if lowered == b"x-ratelimit-limit":
                upstream_limits = True
            elif lowered in (b"location", b"content-location"):
                value = self._public_location(value)
            headers.append((lowered, value))
        for name, value in extra_headers:
            # The token service's own bucket limits (on /consume) describe that answer; ours are
            # in the RateLimit fields either way.
            if upstream_limits and name.startswith(b"x-ratelimit-"):
                continue
            headers.append((name, value))

        try:
            first = await answer.next_chunk()
        except OutboundError as exc:
            if exc.kind == "timeout":
                raise UpstreamTimeout() from None
            raise UpstreamBrokeOff(exc.reason) from None
        if first is None or answer.at_end():
            # All there is already arrived (a short answer): one write, no watcher.
            rest = await answer.next_chunk() if first is not None else None
            await send({"type": "http.response.start", "status": status, "headers": headers})
            body = first or b""
            if rest:
                body += rest
                while (more := await answer.next_chunk()) is not None:
                    body += more
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": first, "more_body": True})
        gone = False

        async def until_the_client_leaves() -> None:
            # A long answer (a stream) stops being read from the upstream once nobody wants it.
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            answer.close()

        watcher = asyncio.create_task(until_the_client_leaves())
        try:
            while True:
                try:
                    chunk = await answer.next_chunk()
                except OutboundError as exc:
                    # Too late for an error answer: leaving the body unfinished makes the server
                    # cut the connection, so the client sees a broken body, not a short one.
                    if not gone:
                        log.warning("upstream answer broke off mid-body: %s", exc.reason)
                    return
                if chunk is None:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            watcher.cancel()

    def _public_location(self, value: bytes) -> bytes:
        """A redirect to an internal address becomes the same path on the gateway."""
        for origin in self._internal_origins:
            if value.startswith(origin) and value[len(origin) : len(origin) + 1] in (b"", b"/"):
                return value[len(origin) :] or b"/"
        return value

    def snapshot(self) -> dict[str, object]:
        return {"upstream": self.service_name, **self.breaker.snapshot()}


def _origin(url: str) -> str:
    """scheme://host[:port] of a URL ("" when it has none)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return ""
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _marks_outage(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() == _OUTAGE for name, _ in headers)


def _is_upstream_failure(exc: BaseException) -> bool:
    return isinstance(exc, UpstreamUnreachable | UpstreamTimeout | _Outage503)


def _log_transition(name: str, old: BreakerState, new: BreakerState) -> None:
    level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
    log.log(level, "circuit breaker %s: %s -> %s", name, old.value, new.value)
