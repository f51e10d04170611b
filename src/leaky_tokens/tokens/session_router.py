"""HTTP routes of agent sessions' budgets (issue 13), called by the agent API on the gateway
with the agent's own credentials: every route acts only on the caller's sessions."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, status
from pydantic import Field, StringConstraints

from leaky_tokens.shared.authn import CurrentPrincipal
from leaky_tokens.shared.pagination import PageParams, page_of
from leaky_tokens.shared.schemas import RequestModel
from leaky_tokens.tokens.sessions import AgentSessionService, EventSpec, SessionSpec, SessionView

router = APIRouter(prefix="/api/v1/tokens/sessions", tags=["agent sessions"])

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)]


class SessionCreateBody(RequestModel):
    idempotency_key: str | None = Field(None, max_length=200)
    product_no: Text
    product_type: Literal["dynamic", "static"]
    model: Text
    provider: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    token_budget: int = Field(ge=1, le=10**12)
    lifetime_seconds: int = Field(ge=1, le=30 * 86400)
    org_id: uuid.UUID | None = None


class ActivateBody(RequestModel):
    credential: Annotated[str, StringConstraints(min_length=8, max_length=200)]
    credential_key_id: uuid.UUID


class CloseBody(RequestModel):
    reason: Annotated[str, StringConstraints(max_length=200)] = "terminated by its owner"


class RotateBody(RequestModel):
    expected_key_id: uuid.UUID | None
    model: Text
    provider: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    credential: Annotated[str, StringConstraints(min_length=8, max_length=200)]
    credential_key_id: uuid.UUID
    reason: Annotated[str, StringConstraints(min_length=1, max_length=500)]


class EventBody(RequestModel):
    source: Literal["agent", "gateway"] = "agent"
    outcome: Literal["success", "http_error"]
    status_code: int | None = Field(None, ge=100, le=599)
    latency_ms: int | None = Field(None, ge=0, le=3_600_000)
    error_kind: Annotated[str, StringConstraints(max_length=32)] | None = None
    message: Annotated[str, StringConstraints(max_length=500)] | None = None


def _service(request: Request) -> AgentSessionService:
    service: AgentSessionService = request.app.state.session_service
    return service


def session_body(view: SessionView) -> dict[str, Any]:
    s = view.session
    returned = s.returned_credit + s.returned_allowance + s.returned_dropped
    return {
        "id": str(s.id),
        "userId": str(s.user_id),
        "status": s.status,
        "productNo": s.product_no,
        "productType": s.product_type,
        "model": s.model,
        "provider": s.provider,
        "tokenBudget": s.token_budget,
        "budgetLeft": view.budget_left,
        "inFlight": view.in_flight,
        "spent": view.spent,
        "returned": returned,
        "returnDropped": s.returned_dropped,
        "credential": s.credential if s.status == "active" else None,
        "credentialKeyId": str(s.credential_key_id) if s.credential_key_id else None,
        "rotations": s.rotations,
        "failureCode": s.failure_code,
        "closeReason": s.close_reason,
        "expiresAt": s.expires_at.isoformat(),
        "createdAt": s.created_at.isoformat(),
        "activatedAt": s.activated_at.isoformat() if s.activated_at else None,
        "closedAt": s.closed_at.isoformat() if s.closed_at else None,
    }


@router.post("", status_code=status.HTTP_200_OK)
async def create_session(
    body: SessionCreateBody, request: Request, principal: CurrentPrincipal
) -> dict[str, Any]:
    view, created = await _service(request).create_session(
        principal,
        SessionSpec(
            idempotency_key=body.idempotency_key,
            product_no=body.product_no,
            product_type=body.product_type,
            model=body.model,
            provider=body.provider,
            token_budget=body.token_budget,
            lifetime_seconds=body.lifetime_seconds,
            org_id=body.org_id,
        ),
    )
    return {**session_body(view), "created": created}


@router.get("")
async def list_sessions(
    request: Request,
    principal: CurrentPrincipal,
    page: PageParams,
    status_filter: Annotated[str | None, Query(alias="status", max_length=16)] = None,
) -> dict[str, Any]:
    views, total = await _service(request).list_sessions(principal, page, status_filter)
    return page_of([session_body(v) for v in views], page, total)


@router.get("/stats")
async def session_stats(request: Request, principal: CurrentPrincipal) -> dict[str, Any]:
    stats = await _service(request).stats(principal)
    return {
        "byStatus": {
            k: {"sessions": n, "budget": b, "returned": r}
            for k, (n, b, r) in stats["byStatus"].items()
        },
        "activeBudgetLeft": stats["activeBudgetLeft"],
    }


@router.get("/{session_id}")
async def get_session(
    session_id: uuid.UUID, request: Request, principal: CurrentPrincipal
) -> dict[str, Any]:
    return session_body(await _service(request).get_session(principal, session_id))


@router.post("/{session_id}/activate")
async def activate_session(
    session_id: uuid.UUID, body: ActivateBody, request: Request, principal: CurrentPrincipal
) -> dict[str, Any]:
    view, won = await _service(request).activate_session(
        principal, session_id, body.credential, body.credential_key_id
    )
    return {**session_body(view), "activated": won}


@router.post("/{session_id}/close")
async def close_session(
    session_id: uuid.UUID, body: CloseBody, request: Request, principal: CurrentPrincipal
) -> dict[str, Any]:
    view = await _service(request).close_session(
        principal, session_id, expired=False, reason=body.reason
    )
    return session_body(view)


@router.post("/{session_id}/rotate")
async def rotate_session(
    session_id: uuid.UUID, body: RotateBody, request: Request, principal: CurrentPrincipal
) -> dict[str, Any]:
    view, before = await _service(request).rotate_session(
        principal,
        session_id,
        expected_key_id=body.expected_key_id,
        model=body.model,
        provider=body.provider,
        credential=body.credential,
        credential_key_id=body.credential_key_id,
        reason=body.reason,
    )
    return {
        **session_body(view),
        "previous": {
            "model": before.model,
            "provider": before.provider,
            "credentialKeyId": str(before.credential_key_id) if before.credential_key_id else None,
        },
    }


@router.post("/{session_id}/events", status_code=status.HTTP_201_CREATED)
async def record_event(
    session_id: uuid.UUID, body: EventBody, request: Request, principal: CurrentPrincipal
) -> dict[str, Any]:
    event = await _service(request).record_event(
        principal,
        session_id,
        EventSpec(
            source=body.source,
            outcome=body.outcome,
            status_code=body.status_code,
            latency_ms=body.latency_ms,
            error_kind=body.error_kind,
            message=body.message,
        ),
    )
    return {"id": event.id, "createdAt": event.created_at.isoformat()}


@router.get("/{session_id}/events")
async def recent_events(
    session_id: uuid.UUID,
    request: Request,
    principal: CurrentPrincipal,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> dict[str, Any]:
    view, events = await _service(request).recent_events(principal, session_id, limit)
    return {
        "session": session_body(view),
        "items": [
            {
                "id": e.id,
                "source": e.source,
                "outcome": e.outcome,
                "statusCode": e.status_code,
                "latencyMs": e.latency_ms,
                "errorKind": e.error_kind,
                "message": e.message,
                "detail": e.detail,
                "createdAt": e.created_at.isoformat(),
            }
            for e in events
        ],
    }
