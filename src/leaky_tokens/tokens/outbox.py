"""Outbox events of the token service: built here, stored by the repository in the same
transaction as the change they announce, relayed to analytics later."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from leaky_tokens.shared.clock import utc_iso
from leaky_tokens.tokens.models import OutboxEvent

USAGE = "usage"
PURCHASE = "purchase"

# decision -> event type (past tense)
USAGE_EVENT_TYPES = {
    "ALLOWED": "TokensConsumed",
    "RATE_LIMITED": "ConsumptionRateLimited",
    "QUOTA_INSUFFICIENT": "ConsumptionQuotaInsufficient",
    "PROVIDER_FAILURE": "ProviderCallFailed",
    "ABANDONED": "ConsumptionAbandoned",
}


def usage_event(
    decision: str,
    *,
    user_id: uuid.UUID,
    org_id: uuid.UUID | None,
    provider: str,
    tokens: int,
    now: datetime,
    request_id: str | None,
    extra: dict[str, Any] | None = None,
) -> OutboxEvent:
    event_id = uuid.uuid4()
    payload: dict[str, Any] = {
        "eventId": str(event_id),
        "type": USAGE_EVENT_TYPES[decision],
        "decision": decision,
        "allowed": decision == "ALLOWED",
        "userId": str(user_id),
        "orgId": str(org_id) if org_id else None,
        "provider": provider,
        "tokens": tokens,
        "occurredAt": utc_iso(now),
        "requestId": request_id,
    }
    if extra:
        payload.update(extra)
    return OutboxEvent(
        event_id=event_id,
        stream=USAGE,
        event_type=payload["type"],
        aggregate_id=str(user_id),
        payload=payload,
        created_at=now,
        published_at=None,
    )


def purchase_event(
    event_type: str,
    *,
    saga_id: uuid.UUID,
    user_id: uuid.UUID,
    org_id: uuid.UUID | None,
    provider: str,
    tokens: int,
    status: str,
    now: datetime,
    reason: str | None = None,
) -> OutboxEvent:
    """A step or compensation of a purchase saga (stream `purchase`, never counted as usage)."""
    event_id = uuid.uuid4()
    payload: dict[str, Any] = {
        "eventId": str(event_id),
        "type": event_type,
        "sagaId": str(saga_id),
        "userId": str(user_id),
        "orgId": str(org_id) if org_id else None,
        "provider": provider,
        "tokens": tokens,
        "status": status,
        "occurredAt": utc_iso(now),
    }
    if reason:
        payload["reason"] = reason
    return OutboxEvent(
        event_id=event_id,
        stream=PURCHASE,
        event_type=event_type,
        aggregate_id=str(saga_id),
        payload=payload,
        created_at=now,
        published_at=None,
    )
