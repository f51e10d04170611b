"""A fake HTTP service for outbound-client tests: an ASGI app answering from a Python function,
served over a real loopback socket (tests.live_server.serving) so clients speak real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.types import Message, Receive, Scope, Send

from tests.live_server import serving


@dataclass
class Asked:
    method: str
    path: str
    query: bytes
    headers: dict[str, str]
    body: bytes


@dataclass
class Answer:
    status: int = 200
    body: Any = None  # JSON-encoded unless bytes or str
    headers: list[tuple[str, str]] = field(default_factory=list)

    def encoded(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return orjson.dumps(self.body)


Handler = Callable[[Asked], Answer | Awaitable[Answer]]


class FakeService:
    """Records every request; answers with `handler(request)`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.asked: list[Asked] = []
        self.paths: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        asked = Asked(
            scope["method"],
            scope["path"],
            scope["query_string"],
            {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
            body,
        )
        self.asked.append(asked)
        self.paths.append(asked.path)
        answer = self.handler(asked)
        if not isinstance(answer, Answer):
            answer = await answer
        payload = answer.encoded()
        headers = [(k.lower().encode(), v.encode()) for k, v in answer.headers]
        if not any(k == b"content-type" for k, _ in headers):
            headers.append((b"content-type", b"application/json"))
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


@contextlib.asynccontextmanager
async def fake_service(handler: Handler) -> AsyncIterator[tuple[str, FakeService]]:
    """(base URL, the service) for a fake answering with `handler`."""
    service = FakeService(handler)
    async with serving(service) as url:  # type: ignore[arg-type]
        yield url, service


class Gate:
    """In front of a real ASGI app served over loopback: records the paths asked, can go
    "down" (answers 503 without asking the app, for every path or the `down_paths`), and can
    hold back the app's answer for one path until told."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.paths: list[str] = []
        self.down = False
        self.down_paths: set[str] = set()
        self.refused = asyncio.Event()  # set once a request was refused while down
        self.hold_path: str | None = None
        self.release: asyncio.Event | None = None
        self.holding = asyncio.Event()  # an answer is being held back

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        path = scope["path"]
        self.paths.append(path)
        if self.down or path in self.down_paths:
            self.refused.set()
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b"down"})
            return
        if self.release is not None and path == self.hold_path:
            held: list[Message] = []

            async def keep(message: Message) -> None:
                held.append(message)

            await self.inner(scope, receive, keep)
            self.holding.set()
            await self.release.wait()
            for message in held:
                await send(message)
            return
        await self.inner(scope, receive, send)


@contextlib.asynccontextmanager
async def gated(app: Any) -> AsyncIterator[tuple[str, Gate]]:
    """(base URL, the gate) for `app` (its lifespan already running) behind a Gate."""
    gate = Gate(app)
    async with serving(gate) as url:  # type: ignore[arg-type]
        yield url, gate
