"""HTTP routes of the token service (plan §2, §3.2, §4, §8.1)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status

from leaky_tokens.shared.authn import CurrentPrincipal
from leaky_tokens.shared.errors import ServiceUnavailable
from leaky_tokens.shared.events import INTERNAL_TOKEN_HEADER, check_internal_token
from leaky_tokens.shared.pagination import Page, PageParams, page_of
from leaky_tokens.shared.request_context import current_request_id
from leaky_tokens.tokens.flags import FlagState
from leaky_tokens.tokens.models import PurchaseSaga
from leaky_tokens.tokens.purchase_saga import PurchaseRequest, PurchaseService
from leaky_tokens.tokens.schemas import (
    ConsumeCreate,
    ConsumeRead,
    FlagSource,
    FlagsRead,
    FlagUpdate,
    OrgQuotaRead,
    OrgQuotaSet,
    OutboxBacklogRead,
    PoolRead,
    Provider,
    PurchaseAccepted,
    PurchaseCreate,
    PurchaseRead,
    QuotaRead,
    QuotaSet,
    StatusRead,
)
from leaky_tokens.tokens.service import (
    ORG_POOL,
    USER_POOL,
    ConsumeRequest,
    QuotaView,
    TokenService,
    rate_limit_headers,
)

router = APIRouter(prefix="/api/v1/tokens")


def _service(request: Request) -> TokenService:
    service: TokenService = request.app.state.token_service
    return service


@router.get("/status", tags=["health"])
async def service_status(request: Request) -> StatusRead:
    service = _service(request)
    if not await service.db.ping():
        raise ServiceUnavailable("token database unavailable")
    return StatusRead(
        service="token-service",
        status="UP",
        timestamp=service.clock.now(),
        checks={"database": "UP"},
        providers=service.providers.breaker_snapshots(),
        inference_providers=request.app.state.inference_service.breaker_snapshots(),
    )


def _user_quota(view: QuotaView) -> QuotaRead:
    return QuotaRead(
        user_id=view.owner_id,
        provider=view.provider,
        total_tokens=view.total_tokens,
        remaining_tokens=view.remaining_tokens,
        reset_at=view.reset_at,
        updated_at=view.updated_at,
        allowance_tokens=view.allowance_tokens,
        allowance_remaining_tokens=view.allowance_remaining,
        credit_tokens=view.credit_tokens,
    )


def _org_quota(view: QuotaView) -> OrgQuotaRead:
    return OrgQuotaRead(
        org_id=view.owner_id,
        provider=view.provider,
        total_tokens=view.total_tokens,
        remaining_tokens=view.remaining_tokens,
        reset_at=view.reset_at,
        updated_at=view.updated_at,
        allowance_tokens=view.allowance_tokens,
        allowance_remaining_tokens=view.allowance_remaining,
        credit_tokens=view.credit_tokens,
    )


@router.get("/quota", tags=["quota"])
async def get_user_quota(
    request: Request,
    principal: CurrentPrincipal,
    user_id: Annotated[uuid.UUID, Query(alias="userId")],
    provider: Annotated[Provider, Query()],
) -> QuotaRead:
    view = await _service(request).get_quota(principal, USER_POOL, user_id, provider)
    return _user_quota(view)


@router.get("/quotas", tags=["quota"])
async def list_quotas(
    request: Request,
    principal: CurrentPrincipal,
    page: PageParams,
    user_id: Annotated[uuid.UUID | None, Query(alias="userId")] = None,
    org_id: Annotated[uuid.UUID | None, Query(alias="orgId")] = None,
) -> Page[PoolRead]:
    """The pools the caller may read: a USER's own and their organisations'; an ADMIN's pick
    (`userId`, `orgId`), else every pool. Users' pools first, then organisations'."""
    views, total = await _service(request).list_quotas(
        principal, page, user_id=user_id, org_id=org_id
    )
    items = [
        PoolRead(
            kind=v.kind,
            owner_id=v.owner_id,
            provider=v.provider,
            total_tokens=v.total_tokens,
            remaining_tokens=v.remaining_tokens,
            reset_at=v.reset_at,
            updated_at=v.updated_at,
        )
        for v in views
    ]
    return Page[PoolRead].model_validate(page_of(items, page, total))


@router.get("/quota/org", tags=["quota"])
async def get_org_quota(
    request: Request,
    principal: CurrentPrincipal,
    org_id: Annotated[uuid.UUID, Query(alias="orgId")],
    provider: Annotated[Provider, Query()],
) -> OrgQuotaRead:
    view = await _service(request).get_quota(principal, ORG_POOL, org_id, provider)
    return _org_quota(view)


@router.put("/quota", tags=["quota"])
async def set_user_quota(
    body: QuotaSet, request: Request, principal: CurrentPrincipal
) -> QuotaRead:
    view = await _service(request).set_quota(
        principal,
        USER_POOL,
        body.user_id,
        body.provider,
        total=body.total_tokens,
        remaining=body.remaining_tokens,
        reset_at=body.reset_at,
    )
    return _user_quota(view)


@router.put("/quota/org", tags=["quota"])
async def set_org_quota(
    body: OrgQuotaSet, request: Request, principal: CurrentPrincipal
) -> OrgQuotaRead:
    view = await _service(request).set_quota(
        principal,
        ORG_POOL,
        body.org_id,
        body.provider,
        total=body.total_tokens,
        remaining=body.remaining_tokens,
        reset_at=body.reset_at,
    )
    return _org_quota(view)


@router.post(
    "/consume",
    tags=["consumption"],
    responses={
        402: {"description": "insufficient token quota (nothing deducted)"},
        429: {"description": "leaky bucket full: allowed=false, waitSeconds>0, Retry-After"},
        502: {"description": "provider call failed (quota and bucket refunded)"},
    },
)
async def consume(
    body: ConsumeCreate, request: Request, response: Response, principal: CurrentPrincipal
) -> ConsumeRead:
    result = await _service(request).consume_tokens(
        principal,
        ConsumeRequest(body.user_id, body.org_id, body.provider, body.tokens, body.prompt),
        current_request_id(),
    )
    response.headers.update(rate_limit_headers(result.decision, result.at))
    decision = result.decision
    return ConsumeRead(
        allowed=True,
        capacity=decision.capacity,
        used=decision.used,
        remaining=decision.remaining,
        wait_seconds=0,
        timestamp=result.at,
        provider_response=result.provider_response,
        quota_remaining=result.quota_remaining,
    )


def _purchases(request: Request) -> PurchaseService:
    service: PurchaseService = request.app.state.purchase_service
    return service


def _purchase_read(saga: PurchaseSaga) -> PurchaseRead:
    return PurchaseRead(
        id=saga.id,
        user_id=saga.user_id,
        org_id=saga.org_id,
        provider=saga.provider,
        tokens=saga.tokens,
        idempotency_key=saga.idempotency_key,
        status=saga.status,
        failure_reason=saga.failure_reason,
        created_at=saga.created_at,
        updated_at=saga.updated_at,
    )


@router.post(
    "/purchase",
    status_code=status.HTTP_202_ACCEPTED,
    tags=["purchases"],
    responses={
        409: {"description": "Idempotency-Key reused with a different payload"},
        503: {"description": "purchases switched off (flag saga.purchases-enabled)"},
    },
)
async def start_purchase(
    body: PurchaseCreate,
    request: Request,
    principal: CurrentPrincipal,
    idempotency_key: Annotated[
        str | None,
        Header(description="Replays with the same key and payload return the same saga"),
    ] = None,
) -> PurchaseAccepted:
    saga, _ = await _purchases(request).start_purchase(
        principal,
        PurchaseRequest(body.user_id, body.org_id, body.provider, body.tokens),
        idempotency_key,
    )
    return PurchaseAccepted(saga_id=saga.id, status=saga.status, created_at=saga.created_at)


@router.get("/purchase/{reference}", tags=["purchases"])
async def get_purchase(
    reference: str, request: Request, principal: CurrentPrincipal
) -> PurchaseRead:
    """`reference` is the saga id or the caller's Idempotency-Key."""
    return _purchase_read(await _purchases(request).get_purchase(principal, reference))


@router.get("/purchase/{reference}/events", tags=["purchases"])
async def get_purchase_events(
    reference: str, request: Request, principal: CurrentPrincipal
) -> dict[str, Any]:
    """The saga's outbox trail: each step and compensation, oldest first."""
    events = await _purchases(request).purchase_events(principal, reference)
    return {"items": events, "count": len(events)}


@router.get("/purchases", tags=["purchases"])
async def list_purchases(
    request: Request,
    principal: CurrentPrincipal,
    page: PageParams,
    user_id: Annotated[
        uuid.UUID | None, Query(alias="userId", description="ADMIN: one user's; USER: own only")
    ] = None,
) -> Page[PurchaseRead]:
    """Sagas, newest first: a USER's own; an ADMIN everyone's, or one `userId`'s."""
    sagas, total = await _purchases(request).list_purchases(principal, page, user_id)
    return Page[PurchaseRead].model_validate(
        page_of([_purchase_read(s) for s in sagas], page, total)
    )


@router.get("/admin/outbox", tags=["admin"])
async def outbox_backlog(request: Request, principal: CurrentPrincipal) -> OutboxBacklogRead:
    """ADMIN: events written but not yet taken by the transport to analytics (the figures of
    `tokens_outbox_backlog_events` and `tokens_outbox_oldest_unpublished_age_seconds`)."""
    service = _service(request)
    backlog = await service.outbox_backlog(principal)
    now = service.clock.now()
    oldest = backlog.oldest_created_at
    return OutboxBacklogRead(
        unpublished=backlog.unpublished,
        oldest_unpublished_at=oldest,
        oldest_unpublished_age_seconds=(
            round(max(0.0, (now - oldest).total_seconds()), 3) if oldest else 0.0
        ),
        measured_at=now,
    )


def _flags_read(states: dict[str, FlagState]) -> FlagsRead:
    return FlagsRead(
        flags={name: state.enabled for name, state in states.items()},
        sources={
            name: FlagSource(source=state.source, updated_at=state.updated_at)
            for name, state in states.items()
        },
    )


@router.get("/admin/flags", tags=["admin"])
async def get_flags(request: Request, principal: CurrentPrincipal) -> FlagsRead:
    """Every flag's value and where it came from (settings seed a flag only when it was never
    set; after that the admin API's value stands, across restarts and on every replica)."""
    return _flags_read(await _purchases(request).read_flags(principal))


@router.put("/admin/flags/{name}", tags=["admin"])
async def set_flag(
    name: str, body: FlagUpdate, request: Request, principal: CurrentPrincipal
) -> FlagsRead:
    return _flags_read(await _purchases(request).set_flag(principal, name, body.enabled))


# The CLI's writes while the service runs (`leaky-tokens admin set-quota`): through this process
# rather than into its SQLite file behind its back. Off /api/v1, so the gateway never routes
# here; authenticated by the internal token of the data directory.
internal_router = APIRouter(prefix="/internal", include_in_schema=False)


def _internal_only(request: Request) -> None:
    expected: str = request.app.state.internal_token
    check_internal_token(expected.encode(), request.headers.get(INTERNAL_TOKEN_HEADER))


@internal_router.put("/quota", dependencies=[Depends(_internal_only)])
async def put_user_quota_internal(body: QuotaSet, request: Request) -> QuotaRead:
    view = await _service(request).put_quota(
        USER_POOL,
        body.user_id,
        body.provider,
        total=body.total_tokens,
        remaining=body.remaining_tokens,
        reset_at=body.reset_at,
    )
    return _user_quota(view)


@internal_router.put("/quota/org", dependencies=[Depends(_internal_only)])
async def put_org_quota_internal(body: OrgQuotaSet, request: Request) -> OrgQuotaRead:
    view = await _service(request).put_quota(
        ORG_POOL,
        body.org_id,
        body.provider,
        total=body.total_tokens,
        remaining=body.remaining_tokens,
        reset_at=body.reset_at,
    )
    return _org_quota(view)
