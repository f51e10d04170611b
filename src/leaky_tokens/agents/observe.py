"""What the gateway sees of a session's calls (issue 13): the status and latency of each /v1
call made with a session's credential (through its proxy URL or as a key), recorded as the
session's `gateway` events after the answer has gone, off the request's path."""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from leaky_tokens.agents.upstreams import AgentError, Services
from leaky_tokens.shared.authn import Authenticator
from leaky_tokens.shared.errors import AppError

log = logging.getLogger("leaky_tokens.agents")

_MAX_PENDING = 256  # records on their way; more are dropped (and counted) rather than queued
_OBSERVED = ("/v1/chat/completions", "/v1/responses", "/v1/embeddings")


def _credential(scope: Scope) -> str | None:
    """The API key a call is made with, if any (a JWT is never a session's credential)."""
    for name, value in scope["headers"]:
        text = bytes(value).decode("latin-1").strip()
        if name == b"authorization":
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip().startswith("leaky_"):
                return token.strip()
        elif name == b"x-api-key" and text.startswith("leaky_"):
            return text
    return None


class SessionObserver:
    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticator: Authenticator,
        services: Services,
        pending: set[asyncio.Task[None]],
        dropped: Counter,
    ) -> None:
        """`pending`: the records on their way, owned by the lifespan (which waits for them
        before closing `services`); `dropped` counts those given up when too many were."""
        self.app = app
        self.authenticator = authenticator
        self.services = services
        self.pending = pending
        self.dropped = dropped

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in _OBSERVED:
            await self.app(scope, receive, send)
            return
        credential = _credential(scope)
        if credential is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [0]

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            latency_ms = round((time.perf_counter() - started) * 1000)
            self._record(credential, status[0] or 500, latency_ms)

    def _record(self, credential: str, status: int, latency_ms: int) -> None:
        if len(self.pending) >= _MAX_PENDING:
            self.dropped.inc()
            return
        task = asyncio.get_running_loop().create_task(self._send(credential, status, latency_ms))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _send(self, credential: str, status: int, latency_ms: int) -> None:
        try:
            principal = await self.authenticator.from_api_key(credential)
        except AppError:
            return  # not a key, or one that died meanwhile: nothing to record
        if principal.session_id is None:
            return
        try:
            await self.services.call(
                "tokens",
                "POST",
                f"/api/v1/tokens/sessions/{principal.session_id}/events",
                headers={"x-api-key": credential},
                json_body={
                    "source": "gateway",
                    "outcome": "success" if status < 400 else "http_error",
                    "statusCode": status,
                    "latencyMs": latency_ms,
                },
            )
        except AgentError as exc:
            log.debug("session event not recorded: %s", exc.message)


def dropped_counter(registry: CollectorRegistry) -> Counter:
    return Counter(
        "agent_session_observations_dropped",
        "Gateway observations of session calls not recorded (too many on their way)",
        registry=registry,
    )


async def drain(pending: set[asyncio.Task[None]], timeout_seconds: float = 2.0) -> None:
    """Let the records on their way finish (bounded), then cancel what is left."""
    if pending:
        _, late = await asyncio.wait(set(pending), timeout=timeout_seconds)
        for task in late:
            task.cancel()
