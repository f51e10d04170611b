"""ORM tables owned by the analytics service: usage events and (separately) purchase events."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from leaky_tokens.shared.database import UtcDateTime

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
AutoId = BigInteger().with_variant(Integer(), "sqlite")


class AnalyticsBase(DeclarativeBase):
    pass


class UsageEvent(AnalyticsBase):
    """One consume decision of the token service, stored once per event id."""

    __tablename__ = "usage_event"
    __table_args__ = (
        # A redelivered event is stored once (insert ... on conflict do nothing).
        UniqueConstraint("event_id", name="uq_usage_event_event_id"),
        Index("ix_usage_event_provider_time", "provider", "occurred_at"),
        Index("ix_usage_event_user_provider_time", "user_id", "provider", "occurred_at"),
        Index("ix_usage_event_org_provider_time", "org_id", "provider", "occurred_at"),
        Index("ix_usage_event_model_time", "model", "occurred_at"),
        Index("ix_usage_event_time", "occurred_at"),  # the retention sweep's walk
    )

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    event_type: Mapped[str] = mapped_column(String(64))
    decision: Mapped[str] = mapped_column(String(32))
    allowed: Mapped[bool] = mapped_column(Boolean)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    org_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    provider: Mapped[str] = mapped_column(String(32))
    tokens: Mapped[int] = mapped_column(BigInteger)  # tokens the request asked for
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime)
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # Calls of the OpenAI-compatible API (/v1) name a catalogue model and split their tokens;
    # /consume events leave these empty.
    model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    latency_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)  # the rest of the payload
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)


class PurchaseEvent(AnalyticsBase):
    """A step or compensation of a purchase saga; never counted as usage."""

    __tablename__ = "purchase_event"
    __table_args__ = (
        UniqueConstraint("event_id", name="uq_purchase_event_event_id"),
        Index("ix_purchase_event_saga_time", "saga_id", "occurred_at"),
        Index("ix_purchase_event_user_time", "user_id", "occurred_at"),
        Index("ix_purchase_event_time", "occurred_at"),
    )

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    event_type: Mapped[str] = mapped_column(String(64))
    saga_id: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    status: Mapped[str | None] = mapped_column(String(32), nullable=True)
    tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)


class UsageRollup(AnalyticsBase):
    """The usage events of one minute and one (user, org, provider, model, decision), summed:
    what is kept of raw events past the raw retention. A minute is rolled up once, in the
    transaction that deletes its raw events, so every event counts once, raw or rolled up."""

    __tablename__ = "usage_rollup"
    __table_args__ = (
        Index("ix_usage_rollup_minute", "minute"),
        Index("ix_usage_rollup_provider_minute", "provider", "minute"),
        Index("ix_usage_rollup_user_provider_minute", "user_id", "provider", "minute"),
        Index("ix_usage_rollup_org_provider_minute", "org_id", "provider", "minute"),
        Index("ix_usage_rollup_model_minute", "model", "minute"),
    )

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    minute: Mapped[datetime] = mapped_column(UtcDateTime)  # the minute's start
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    org_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    provider: Mapped[str] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    decision: Mapped[str] = mapped_column(String(32))
    allowed: Mapped[bool] = mapped_column(Boolean)
    events: Mapped[int] = mapped_column(BigInteger)
    tokens: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)


class RetentionState(AnalyticsBase):
    """How far raw usage events have been rolled up: every event before `rolled_until` lives
    in usage_rollup only (NULL: nothing rolled up yet)."""

    __tablename__ = "usage_rollup_state"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    rolled_until: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class DeadLetter(AnalyticsBase):
    """An event analytics could not count, kept with the reason instead of blocking its stream:
    `invalid` (payload unreadable), `failed` (the database refused it, alone, twice), `late`
    (older than the rolled-up horizon: counting it now could count it twice)."""

    __tablename__ = "event_dead_letter"
    __table_args__ = (
        UniqueConstraint("event_id", name="uq_event_dead_letter_event_id"),
        Index("ix_event_dead_letter_time", "dead_at"),
    )

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    stream: Mapped[str] = mapped_column(String(32))
    event_type: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(16))
    error: Mapped[str] = mapped_column(Text)
    event: Mapped[str] = mapped_column(Text)  # the event as it came, JSON (ASCII-escaped)
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime)
    dead_at: Mapped[datetime] = mapped_column(UtcDateTime)
