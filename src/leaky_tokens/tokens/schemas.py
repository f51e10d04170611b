"""Request and response bodies of the token service (the plan's field names)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import Field, StrictInt, StringConstraints

from leaky_tokens.shared.schemas import ApiModel, RequestModel, UtcInput

# Bigger than any sane request; the bucket capacity is the real per-request ceiling.
MAX_TOKENS = 2**31 - 1
Provider = Annotated[
    str, StringConstraints(strip_whitespace=True, to_lower=True, min_length=1, max_length=32)
]


class ConsumeCreate(RequestModel):
    user_id: uuid.UUID
    org_id: uuid.UUID | None = None
    provider: Provider
    tokens: Annotated[StrictInt, Field(gt=0, le=MAX_TOKENS, description="Tokens to consume")]
    prompt: Annotated[str, StringConstraints(max_length=100_000)] | None = None


class ConsumeRead(ApiModel):
    allowed: bool
    capacity: int
    used: int
    remaining: int
    wait_seconds: float
    timestamp: datetime
    provider_response: dict[str, Any]
    quota_remaining: int = Field(description="Tokens left in the pool charged by this request")


_TOTAL = "What the pool holds when a window starts: allowanceTokens + creditTokens"
_REMAINING = "What can be spent now: allowanceRemainingTokens + creditTokens"
_ALLOWANCE = "The periodic allowance, restored at every window reset (resetAt)"
_ALLOWANCE_REMAINING = "Of the allowance, what is left in the current window (spent first)"
_CREDIT = (
    "Purchased tokens: never reset, spent after the allowance runs out (negative only when a "
    "failed purchase took back credit that was already spent)"
)


class QuotaRead(ApiModel):
    user_id: uuid.UUID
    provider: str
    total_tokens: int = Field(description=_TOTAL)
    remaining_tokens: int = Field(description=_REMAINING)
    reset_at: datetime
    updated_at: datetime
    allowance_tokens: int = Field(description=_ALLOWANCE)
    allowance_remaining_tokens: int = Field(description=_ALLOWANCE_REMAINING)
    credit_tokens: int = Field(description=_CREDIT)


class OrgQuotaRead(ApiModel):
    org_id: uuid.UUID
    provider: str
    total_tokens: int = Field(description=_TOTAL)
    remaining_tokens: int = Field(description=_REMAINING)
    reset_at: datetime
    updated_at: datetime
    allowance_tokens: int = Field(description=_ALLOWANCE)
    allowance_remaining_tokens: int = Field(description=_ALLOWANCE_REMAINING)
    credit_tokens: int = Field(description=_CREDIT)


class PoolRead(ApiModel):
    """A quota pool in a listing: a user's (`kind` "user", `ownerId` the user) or an
    organisation's (`kind` "org")."""

    kind: str
    owner_id: uuid.UUID
    provider: str
    total_tokens: int
    remaining_tokens: int
    reset_at: datetime
    updated_at: datetime


class OutboxBacklogRead(ApiModel):
    unpublished: int  # events not yet taken by the transport
    oldest_unpublished_at: datetime | None
    oldest_unpublished_age_seconds: float
    measured_at: datetime


class _QuotaSet(RequestModel):
    """Sets the periodic allowance (purchased credit is left as it is)."""

    provider: Provider
    total_tokens: Annotated[
        StrictInt, Field(ge=0, le=10**12, description="The allowance per window")
    ]
    remaining_tokens: (
        Annotated[
            StrictInt, Field(ge=0, le=10**12, description="Allowance left now (default: all)")
        ]
        | None
    ) = None
    reset_at: UtcInput | None = None


class QuotaSet(_QuotaSet):
    user_id: uuid.UUID


class OrgQuotaSet(_QuotaSet):
    org_id: uuid.UUID


class ProviderBreaker(ApiModel):
    state: str
    failure_rate: float | None = None


class StatusRead(ApiModel):
    service: str
    status: str
    timestamp: datetime
    checks: dict[str, str]
    providers: dict[str, dict[str, Any]]
    # added: the breakers of the /v1 API's provider adapters
    inference_providers: dict[str, dict[str, Any]] = {}


class PurchaseCreate(RequestModel):
    user_id: uuid.UUID
    org_id: uuid.UUID | None = None
    provider: Provider
    tokens: Annotated[StrictInt, Field(gt=0, le=MAX_TOKENS, description="Tokens to buy")]


class PurchaseAccepted(ApiModel):
    saga_id: uuid.UUID
    status: str
    created_at: datetime


class PurchaseRead(ApiModel):
    id: uuid.UUID
    user_id: uuid.UUID
    org_id: uuid.UUID | None
    provider: str
    tokens: int
    idempotency_key: str | None
    status: str
    failure_reason: str | None
    created_at: datetime
    updated_at: datetime


class FlagUpdate(RequestModel):
    enabled: bool


class FlagSource(ApiModel):
    source: str = Field(
        description='"default" (never set), "settings" (seeded at a first start) or "admin"'
    )
    updated_at: datetime | None


class FlagsRead(ApiModel):
    flags: dict[str, bool]
    sources: dict[str, FlagSource] = Field(description="Where each flag's value came from")
