"""The gateway in-process, in front of a fake upstream served over real HTTP.

Every upstream URL points at one `FakeUpstream` (a raw ASGI app under uvicorn on a loopback
port) that records what it received and answers what the test told it to. Callers reach the
gateway through httpx's ASGI transport, from any client address the test picks. Identity comes
from a `FakeAuthenticator` unless a test brings a real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from leaky_tokens.gateway.app import create_gateway_app
from leaky_tokens.settings import SERVICES, Settings
from leaky_tokens.shared.authn import Authenticator
from leaky_tokens.shared.clock import FakeClock
from leaky_tokens.shared.errors import AppError, InvalidApiKey, InvalidToken
from leaky_tokens.shared.principal import Principal
from tests.live_server import serving

ERROR_KEYS = {"message", "timestamp", "code", "requestId"}
LIMIT_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    path: str
    raw_path: bytes
    query: bytes
    headers: list[tuple[str, str]]
    body: bytes
    client: tuple[str, int]  # the gateway's end of the connection

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]


@dataclass
class Reply:
    status: int = 200
    body: bytes = b'{"ok":true}'
    headers: list[tuple[bytes, bytes]] = field(
        default_factory=lambda: [(b"content-type", b"application/json")]
    )
    chunks: list[bytes] | None = None  # streamed without a length when given
    delay: float = 0.0


class FakeUpstream:
    """Records requests; answers with queued replies, else `default` (a JSON echo)."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.replies: deque[Reply] = deque()
        self.default: Callable[[Seen], Reply] = _echo

    def reply(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            while message["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
                message = await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        seen = Seen(
            method=scope["method"],
            path=scope["path"],
            raw_path=scope["raw_path"],
            query=scope["query_string"],
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
            body=body,
            client=tuple(scope["client"]),
        )
        self.seen.append(seen)
        reply = self.replies.popleft() if self.replies else self.default(seen)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        headers = list(reply.headers)
        if reply.chunks is None:
            headers.append((b"content-length", str(len(reply.body)).encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        if reply.chunks is None:
            await send({"type": "http.response.body", "body": reply.body})
            return
        for chunk in reply.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def _echo(seen: Seen) -> Reply:
    body = orjson.dumps({"method": seen.method, "path": seen.path, "length": len(seen.body)})
    return Reply(body=body)


class FakeAuthenticator:
    """Credentials the test declared: a principal, or the error the auth service would give."""

    def __init__(self) -> None:
        self.keys: dict[str, Principal | AppError] = {}
        self.tokens: dict[str, Principal | AppError] = {}
        self.calls: list[tuple[str, str]] = []
        self.closed = False

    def add_key(self, *, admin: bool = False, user_id: uuid.UUID | None = None) -> str:
        raw = f"leaky_{uuid.uuid4()}_{uuid.uuid4().hex}{uuid.uuid4().hex[:16]}"
        self.keys[raw] = Principal(
            user_id=user_id or uuid.uuid4(),
            roles=frozenset({"USER", "ADMIN"} if admin else {"USER"}),
            method="api_key",
            api_key_id=uuid.uuid4(),
        )
        return raw

    def add_token(self, *, admin: bool = False, user_id: uuid.UUID | None = None) -> str:
        token = f"token-{uuid.uuid4().hex}"
        self.tokens[token] = Principal(
            user_id=user_id or uuid.uuid4(),
            roles=frozenset({"USER", "ADMIN"} if admin else {"USER"}),
        )
        return token

    async def from_api_key(self, raw_key: str) -> Principal:
        self.calls.append(("api_key", raw_key))
        return _answer(self.keys.get(raw_key, InvalidApiKey()))

    async def from_bearer(self, token: str) -> Principal:
        self.calls.append(("bearer", token))
        return _answer(self.tokens.get(token, InvalidToken()))

    async def aclose(self) -> None:
        self.closed = True


def _answer(found: Principal | AppError) -> Principal:
    if isinstance(found, AppError):
        raise found
    return found


@dataclass
class Gateway:
    app: FastAPI
    upstream: FakeUpstream
    auth: Any
    clock: FakeClock
    settings: Settings
    _clients: list[httpx.AsyncClient] = field(default_factory=list)

    def client(self, ip: str = "203.0.113.7", port: int = 40000) -> httpx.AsyncClient:
        """A client calling from (ip, port)."""
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app, client=(ip, port)),
            base_url="http://gateway.test",
            timeout=10,
        )
        self._clients.append(client)
        return client


INTERNAL_TOKEN = "gateway-harness-internal-token"


def gateway_settings(
    upstream_url: str, redis_url: str = "", redis: dict[str, Any] | None = None, **gateway: Any
) -> Settings:
    proxies = gateway.pop("trusted_proxies", None)  # a root setting, shared with auth
    return Settings(
        access_log=False,
        metrics_exposure="open",  # the harness's clients call from documentation addresses
        docs_exposure="open",
        **({} if proxies is None else {"trusted_proxies": proxies}),
        internal_token=INTERNAL_TOKEN,
        redis_url=redis_url,
        redis=redis or {},
        urls=dict.fromkeys(SERVICES, upstream_url),
        gateway=gateway,
    )


@contextlib.asynccontextmanager
async def running_gateway(
    *,
    upstream_url: str | None = None,
    authenticator: Authenticator | None = None,
    redis_url: str = "",
    redis: dict[str, Any] | None = None,
    clock: FakeClock | None = None,
    **gateway: Any,
) -> AsyncIterator[Gateway]:
    """The gateway app with its lifespan running, every upstream at one fake (or `upstream_url`)."""
    upstream = FakeUpstream()
    auth = authenticator or FakeAuthenticator()
    clock = clock or FakeClock()
    async with contextlib.AsyncExitStack() as stack:
        url = upstream_url or await stack.enter_async_context(serving(upstream))
        settings = gateway_settings(url, redis_url, redis, **gateway)
        app = create_gateway_app(settings, authenticator=auth, clock=clock)
        await stack.enter_async_context(app.router.lifespan_context(app))
        running = Gateway(app, upstream, auth, clock, settings)
        try:
            yield running
        finally:
            for client in running._clients:
                await client.aclose()


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Our error body with this status and code, and the rate-limit fields; returns the body."""
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body.keys() >= ERROR_KEYS, body
    assert body["code"] == code, body
    assert body["requestId"] == response.headers["x-request-id"]
    for name in LIMIT_HEADERS:
        assert name in response.headers, (name, response.headers)
    return body
