"""ORM tables owned by the token service."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from leaky_tokens.shared.database import UtcDateTime

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
AutoId = BigInteger().with_variant(Integer(), "sqlite")


class TokensBase(DeclarativeBase):
    pass


class TokenPool(TokensBase):
    """A quota pool of one owner (a user or an organisation) for one provider, holding two
    balances: the periodic allowance (`total_tokens`, of which `remaining_tokens` is left in the
    window ending at `reset_at`; the window resets lazily) and the purchased credit
    (`credit_tokens`), which never resets and is spent after the allowance. Credit is negative
    only when a compensated purchase takes back credit that was already spent (a debt)."""

    __tablename__ = "token_pool"
    __table_args__ = (
        UniqueConstraint("owner_kind", "owner_id", "provider", name="uq_token_pool_owner"),
        CheckConstraint("remaining_tokens >= 0", name="ck_token_pool_remaining_nonneg"),
        CheckConstraint("total_tokens >= 0", name="ck_token_pool_total_nonneg"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    owner_kind: Mapped[str] = mapped_column(String(8))  # "user" | "org"
    owner_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    provider: Mapped[str] = mapped_column(String(32))
    total_tokens: Mapped[int] = mapped_column(BigInteger)
    remaining_tokens: Mapped[int] = mapped_column(BigInteger)
    credit_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    reset_at: Mapped[datetime] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # The split of the latest reservation, written by the reserving UPDATE itself: RETURNING
    # sees only new values, and this is how that one statement tells its caller what it took
    # from each balance (PostgreSQL before 18 has no RETURNING OLD).
    last_reserved_allowance: Mapped[int] = mapped_column(BigInteger, default=0)
    last_reserved_credit: Mapped[int] = mapped_column(BigInteger, default=0)


class Reservation(TokensBase):
    """Tokens taken from a pool for a consume still in flight. Whoever deletes the row settles
    it (commit or refund), so a refund happens at most once; expired rows are refunded by the
    sweeper after a crash."""

    __tablename__ = "token_reservation"
    __table_args__ = (Index("ix_token_reservation_expires_at", "expires_at"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    pool_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    tokens: Mapped[int] = mapped_column(BigInteger)  # allowance_tokens + credit_tokens
    # Where the reserved tokens came from; a settlement refunds the credit part first.
    allowance_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    credit_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    # The pool's reset_at when reserved: a refund after a window reset is dropped, because the
    # new window started full.
    pool_reset_at: Mapped[datetime] = mapped_column(UtcDateTime)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    org_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    provider: Mapped[str] = mapped_column(String(32))
    # The request that reserved (so an abandoned reservation's event still names it).
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)


class OutboxEvent(TokensBase):
    """Events written in the same transaction as the change they announce (relayed later)."""

    __tablename__ = "token_outbox"
    __table_args__ = (Index("ix_token_outbox_unpublished", "published_at", "id"),)

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True)
    stream: Mapped[str] = mapped_column(String(32))  # "usage" | "purchase"
    event_type: Mapped[str] = mapped_column(String(64))
    aggregate_id: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class PurchaseSaga(TokensBase):
    """One token purchase, driven step by step by the orchestrator.

    Forward: STARTED -> PAYMENT_RESERVED -> TOKENS_ALLOCATED -> COMPLETED. On failure the saga
    turns COMPENSATING and undoes what its flags say was done, then ends FAILED. Every change is
    a conditional UPDATE on (status, lease_owner), so only the lease holder moves it, once.
    """

    __tablename__ = "purchase_saga"
    __table_args__ = (
        UniqueConstraint("user_id", "idempotency_key", name="uq_purchase_saga_user_key"),
        Index("ix_purchase_saga_due", "status", "next_attempt_at"),
        Index("ix_purchase_saga_user_created", "user_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    org_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    provider: Mapped[str] = mapped_column(String(32))
    tokens: Mapped[int] = mapped_column(BigInteger)
    idempotency_key: Mapped[str | None] = mapped_column(String(100), nullable=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(24))
    payment_reserved: Mapped[bool] = mapped_column(Boolean, default=False)
    tokens_allocated: Mapped[bool] = mapped_column(Boolean, default=False)
    failure_reason: Mapped[str | None] = mapped_column(String(500), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class FeatureFlag(TokensBase):
    """Runtime switches shared by every replica (changed without a restart). A row exists once
    a flag was set: by the settings of the first process that started with it ("settings"),
    or by the admin API ("admin"), whose value then stands across restarts."""

    __tablename__ = "feature_flag"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean)
    source: Mapped[str] = mapped_column(String(16))  # "settings" | "admin"
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class StubPaymentOperation(TokensBase):
    """The in-process payment stub's ledger: one row per (saga, step), so a retried call never
    charges, captures or releases twice."""

    __tablename__ = "stub_payment_operation"

    saga_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    step: Mapped[str] = mapped_column(String(16), primary_key=True)  # reserve|capture|release
    amount: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class AgentSession(TokensBase):
    """An agent session (issue 13): a budget moved out of its owner's pool into a pool of its
    own (owner_kind "session", owner_id = this id), spent through its credential, and given back
    once when it ends. pending -> active -> terminated | expired; failed when activation could
    not move the budget. `funded_*` say where the budget came from, so what is left goes back
    the way a settlement would: credit first, the allowance only into the window it left."""

    __tablename__ = "agent_session"
    __table_args__ = (
        UniqueConstraint("user_id", "idempotency_key", name="uq_agent_session_user_key"),
        Index("ix_agent_session_user_created", "user_id", "created_at"),
        Index("ix_agent_session_status_expires", "status", "expires_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    idempotency_key: Mapped[str | None] = mapped_column(String(100), nullable=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    product_no: Mapped[str] = mapped_column(String(64))
    product_type: Mapped[str] = mapped_column(String(8))  # "dynamic" | "static"
    model: Mapped[str] = mapped_column(String(128))
    provider: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    token_budget: Mapped[int] = mapped_column(BigInteger)
    funding_kind: Mapped[str] = mapped_column(String(8))  # "user" | "org"
    funding_owner_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    funding_provider: Mapped[str] = mapped_column(String(32))
    funded_allowance: Mapped[int] = mapped_column(BigInteger, default=0)
    funded_credit: Mapped[int] = mapped_column(BigInteger, default=0)
    funded_reset_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # Given back so far (a late settlement after the end is given back by the sweeper).
    returned_credit: Mapped[int] = mapped_column(BigInteger, default=0)
    returned_allowance: Mapped[int] = mapped_column(BigInteger, default=0)
    returned_dropped: Mapped[int] = mapped_column(BigInteger, default=0)
    # The credential (an auth API key bound to this session). Kept so a replay of the
    # creation and the owner's GET can return proxy.full_url; it dies with the session.
    credential: Mapped[str | None] = mapped_column(String(200), nullable=True)
    credential_key_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    rotations: Mapped[int] = mapped_column(Integer, default=0)
    failure_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    close_reason: Mapped[str | None] = mapped_column(String(200), nullable=True)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    activated_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    closed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class AgentSessionEvent(TokensBase):
    """What happened to a session's calls: reported by the agent ("agent"), seen by the gateway
    ("gateway"), or a rotation ("rotation")."""

    __tablename__ = "agent_session_event"
    __table_args__ = (Index("ix_agent_session_event_session", "session_id", "id"),)

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    session_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    source: Mapped[str] = mapped_column(String(16))  # "agent" | "gateway" | "rotation"
    outcome: Mapped[str] = mapped_column(String(16))  # "success" | "http_error" | "rotated"
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    latency_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error_kind: Mapped[str | None] = mapped_column(String(32), nullable=True)
    message: Mapped[str | None] = mapped_column(String(500), nullable=True)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class IdempotencyRecord(TokensBase):
    """One Idempotency-Key of /v1 inference (issue 12), per caller scope (an API key, or a
    user for a JWT). The row is the claim: it is written before anything is reserved or sent,
    and its primary key makes a second claim of the same key impossible. `owner` names the
    attempt that holds it; after `lease_until` another attempt may take it over (a crashed
    call). Completed rows hold the answer to replay; expired rows are swept."""

    __tablename__ = "inference_idempotency"
    __table_args__ = (Index("ix_inference_idempotency_expires_at", "expires_at"),)

    scope: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the key
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 of path + canonical body
    state: Mapped[str] = mapped_column(String(16))  # "in_progress" | "completed"
    owner: Mapped[uuid.UUID] = mapped_column(Uuid)
    lease_until: Mapped[datetime] = mapped_column(UtcDateTime)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    content_type: Mapped[str | None] = mapped_column(String(128), nullable=True)
    body: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)


class StoredResponse(TokensBase):
    """A Response the provider stores (OpenAI's `store`, on by default), and whose it is: the
    provider's store sits behind the gateway's one upstream key, so `GET /v1/responses/{id}`
    is passed on only for the caller that created it (issue 12)."""

    __tablename__ = "inference_response"
    __table_args__ = (Index("ix_inference_response_expires_at", "expires_at"),)

    response_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))  # "user:<id>"
    model: Mapped[str] = mapped_column(String(128))  # the catalogue id the caller used
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
