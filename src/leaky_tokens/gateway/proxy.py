"""Forwarding one request to its upstream and streaming the answer back, behind the upstream's
circuit breaker: one connection pool per upstream (http1.py), hop-by-hop and identity headers
stripped, X-Forwarded-For / X-Request-Id set by us.

What counts against an upstream's breaker: refused or reset connections, timeouts and 503
answers. Every answer the upstream gives (a 402, a 429, a 502 from the token service, even the
503) passes through unchanged; only failures to get an answer become gateway errors.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.types import Receive, Scope, Send

from leaky_tokens.gateway.http1 import Answer, AnswerFailed, ConnectFailed, Http1Pool, ReadTimeout
from leaky_tokens.shared.circuit_breaker import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
)
from leaky_tokens.shared.clock import Clock
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
# Response headers the gateway's own envelope sets (once) on every answer.
_DROP_RESPONSE = HOP_BY_HOP | {
    b"x-request-id",
    b"date",
    b"server",
    *(name for name, _ in SECURITY_HEADERS),
}
_BUFFERED_RESPONSE_LIMIT = 256 * 1024  # read smaller bodies whole: one send instead of many
# Sent without a body (and without "Content-Length: 0") when the client sent none.
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


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


class ClientWentAway(Exception):
    """The client disconnected while its request body was on its way upstream."""


class _Unavailable503(Exception):
    """A 503 answer: passed on unchanged, but counted as a failure by the breaker."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer


@dataclass
class _ClientBody:
    """The request body as the client sends it; remembers why reading it failed, if it did."""

    receive: Receive
    first: bytes
    error: BaseException | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self.first
        while True:
            try:
                message = await self.receive()
            except Exception as exc:  # e.g. the body grew past the size limit
                self.error = exc
                raise
            if message["type"] == "http.disconnect":
                self.error = ClientWentAway()
                raise self.error
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return


class Upstream:
    """One upstream service: where it is, its connection pool and its circuit breaker."""

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        breaker: BreakerConfig,
        clock: Clock,
        timeout_seconds: float,
        connect_timeout_seconds: float,
        max_connections: int,
    ) -> None:
        self.name = name
        self.service_name = SERVICE_NAMES.get(name, name)
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream {name}: {base_url!r} is not an http(s) URL")
        self._pool = Http1Pool(
            parts.hostname,
            parts.port or (443 if parts.scheme == "https" else 80),
            max_connections=max_connections,
            connect_timeout=connect_timeout_seconds,
            read_timeout=timeout_seconds,
            tls=ssl.create_default_context() if parts.scheme == "https" else None,
        )
        self._prefix = parts.path.encode()
        self.breaker = CircuitBreaker(name, breaker, clock, on_state_change=_log_transition)

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: list[tuple[bytes, bytes]],
        extra_headers: Iterable[tuple[bytes, bytes]],
        content_length: int | None,
    ) -> None:
        """Send the request upstream and stream the answer to the client, adding
        `extra_headers` (rate-limit fields; X-RateLimit-* only where the upstream set none).
        `content_length` is the client's, for a body that arrives in several pieces."""
        method: str = scope["method"]
        query: bytes = scope["query_string"]
        target = self._prefix + (scope.get("raw_path") or scope["path"].encode())
        if query:
            target += b"?" + query

        message = await receive()
        first = message.get("body", b"")
        body: bytes | AsyncIterator[bytes] | None
        client_body: _ClientBody | None = None
        if message.get("more_body", False):
            client_body = _ClientBody(receive, first)
            body = client_body.chunks()
        elif first or method not in _BODYLESS_METHODS:
            body = first
        else:
            body = None
        pool = self._pool

        async def answer() -> Answer:
            try:
                got = await pool.request(
                    method, target, headers, body, content_length=content_length
                )
            except ReadTimeout:
                raise UpstreamTimeout() from None
            except ConnectFailed as exc:
                raise UpstreamUnreachable(str(exc)) from None
            except AnswerFailed as exc:
                if client_body is not None and client_body.error is not None:
                    raise client_body.error from None  # the client's doing, not the upstream's
                raise UpstreamUnreachable(str(exc)) from None
            if got.status == 503:
                raise _Unavailable503(got)
            return got

        try:
            got = await self.breaker.call(answer, _is_upstream_failure)
        except CircuitOpenError as exc:
            raise UpstreamOpen(exc.retry_after_seconds) from None
        except _Unavailable503 as unavailable:
            got = unavailable.answer
        try:
            await _relay(got, method, receive, send, extra_headers)
        finally:
            got.close()

    def snapshot(self) -> dict[str, object]:
        return {"upstream": self.service_name, **self.breaker.snapshot()}


def _is_upstream_failure(exc: BaseException) -> bool:
    return isinstance(exc, UpstreamUnreachable | UpstreamTimeout | _Unavailable503)


async def _relay(
    answer: Answer,
    method: str,
    receive: Receive,
    send: Send,
    extra_headers: Iterable[tuple[bytes, bytes]],
) -> None:
    headers: list[tuple[bytes, bytes]] = []
    upstream_limits = False
    for name, value in answer.headers:
        lowered = name.lower()
        if lowered in _DROP_RESPONSE:
            continue
        if lowered == b"x-ratelimit-limit":
            upstream_limits = True
        headers.append((lowered, value))
    for name, value in extra_headers:
        # The token service's own bucket limits (on /consume) describe that answer; ours are
        # in the RateLimit fields either way.
        if upstream_limits and name.startswith(b"x-ratelimit-"):
            continue
        headers.append((name, value))
    length = answer.content_length
    if method == "HEAD" or (length is not None and length <= _BUFFERED_RESPONSE_LIMIT):
        try:
            payload = await answer.read()
        except ReadTimeout:
            raise UpstreamTimeout() from None
        except AnswerFailed as exc:
            raise UpstreamBrokeOff(str(exc)) from None
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        return
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
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
            except (AnswerFailed, ReadTimeout) as exc:
                # Too late for an error answer: leaving the body unfinished makes the server cut
                # the connection, so the client sees a broken body, not a short complete one.
                if not gone:
                    log.warning("upstream answer broke off mid-body: %s", type(exc).__name__)
                return
            if chunk is None:
                break
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        watcher.cancel()


def _log_transition(name: str, old: BreakerState, new: BreakerState) -> None:
    level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
    log.log(level, "circuit breaker %s: %s -> %s", name, old.value, new.value)
