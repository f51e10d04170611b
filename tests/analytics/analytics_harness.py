"""The analytics service in-process on a real database, a fake clock and a fake authenticator,
and builders for the events the token service sends it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from leaky_tokens.analytics.app import EVENTS_PATH, create_analytics_app
from leaky_tokens.analytics.service import AnalyticsService
from leaky_tokens.settings import Settings
from leaky_tokens.shared.clock import FakeClock
from leaky_tokens.shared.errors import InvalidApiKey, InvalidToken
from leaky_tokens.shared.events import INTERNAL_TOKEN_HEADER, Event
from leaky_tokens.shared.principal import Principal

INTERNAL_TOKEN = "test-internal-token"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ERROR_KEYS = {"message", "timestamp", "code", "requestId"}


class FakeAuthenticator:
    """Bearer tokens name the caller: "user:<uuid>" or "admin:<uuid>"."""

    async def from_bearer(self, token: str) -> Principal:
        role, _, user_id = token.partition(":")
        if role not in ("user", "admin"):
            raise InvalidToken()
        roles = {"USER", "ADMIN"} if role == "admin" else {"USER"}
        return Principal(user_id=uuid.UUID(user_id), roles=frozenset(roles))

    async def from_api_key(self, raw_key: str) -> Principal:
        raise InvalidApiKey()


def bearer(user_id: uuid.UUID, *, admin: bool = False) -> dict[str, str]:
    return {"Authorization": f"Bearer {'admin' if admin else 'user'}:{user_id}"}


def usage_event(
    user_id: uuid.UUID,
    tokens: int,
    at: datetime,
    *,
    decision: str = "ALLOWED",
    provider: str = "openai",
    org_id: uuid.UUID | None = None,
    event_id: uuid.UUID | None = None,
    **extra: Any,
) -> Event:
    """A usage event shaped as tokens/outbox.py writes it."""
    event_id = event_id or uuid.uuid4()
    payload: dict[str, Any] = {
        "eventId": str(event_id),
        "type": "TokensConsumed" if decision == "ALLOWED" else "ConsumptionRateLimited",
        "decision": decision,
        "allowed": decision == "ALLOWED",
        "userId": str(user_id),
        "orgId": str(org_id) if org_id else None,
        "provider": provider,
        "tokens": tokens,
        "occurredAt": at.isoformat(),
        "requestId": f"req_{uuid.uuid4().hex}",
        **extra,
    }
    return Event(
        event_id=event_id,
        stream="usage",
        type=payload["type"],
        aggregate_id=str(user_id),
        occurred_at=at,
        payload=payload,
    )


def purchase_event(user_id: uuid.UUID, tokens: int, at: datetime, step: str) -> Event:
    saga_id = uuid.uuid4()
    event_id = uuid.uuid4()
    return Event(
        event_id=event_id,
        stream="purchase",
        type=step,
        aggregate_id=str(saga_id),
        occurred_at=at,
        payload={
            "eventId": str(event_id),
            "type": step,
            "sagaId": str(saga_id),
            "userId": str(user_id),
            "orgId": None,
            "provider": "openai",
            "tokens": tokens,
            "status": "COMPLETED",
            "occurredAt": at.isoformat(),
        },
    )


@dataclass
class AnalyticsClient:
    http: httpx.AsyncClient
    app: FastAPI
    clock: FakeClock

    @property
    def service(self) -> AnalyticsService:
        service: AnalyticsService = self.app.state.analytics_service
        return service

    async def ingest(self, *events: Event, token: str = INTERNAL_TOKEN) -> httpx.Response:
        return await self.http.post(
            EVENTS_PATH,
            json={"events": [e.to_wire() for e in events]},
            headers={INTERNAL_TOKEN_HEADER: token},
        )

    async def store(self, *events: Event) -> None:
        response = await self.ingest(*events)
        assert response.status_code == 200, response.text

    async def get(self, path: str, caller: dict[str, str], **params: Any) -> httpx.Response:
        return await self.http.get(f"/api/v1/analytics/{path}", params=params, headers=caller)

    async def ok(self, path: str, caller: dict[str, str], **params: Any) -> dict[str, Any]:
        response = await self.get(path, caller, **params)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


def analytics_settings(database_url: str, data_dir: Path, **overrides: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        access_log=False,
        redis_url="",
        internal_token=INTERNAL_TOKEN,
        analytics={"database_url": database_url},
        events={"transport": "http"},
        **overrides,
    )


@asynccontextmanager
async def running_analytics(
    database_url: str,
    data_dir: Path,
    *,
    clock: FakeClock | None = None,
    settings: Settings | None = None,
) -> AsyncIterator[AnalyticsClient]:
    clock = clock or FakeClock(NOW)
    app = create_analytics_app(
        settings or analytics_settings(database_url, data_dir),
        authenticator=FakeAuthenticator(),
        clock=clock,
    )
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        yield AnalyticsClient(client, app, clock)


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body.keys() >= ERROR_KEYS, body
    assert body["code"] == code, body
    assert body["requestId"] == response.headers["x-request-id"]
    return body
