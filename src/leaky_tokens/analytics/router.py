"""HTTP routes of the analytics service (plan §6.1-6.3, plus the purchase-events view)."""

from __future__ import annotations

import math
import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request

from leaky_tokens.analytics.schemas import (
    AnomalyRead,
    ConsumerLagRead,
    DeadLettersRead,
    PurchaseEventsRead,
    ReportRead,
    TimeseriesRead,
    TopRead,
    UsageRead,
)
from leaky_tokens.analytics.service import MAX_ITEMS, MAX_SERIES_MINUTES, AnalyticsService
from leaky_tokens.shared.authn import CurrentPrincipal
from leaky_tokens.shared.errors import ServiceUnavailable
from leaky_tokens.shared.pagination import PageParams
from leaky_tokens.shared.schemas import HealthRead

router = APIRouter(prefix="/api/v1/analytics")

ProviderQuery = Annotated[
    str, Query(min_length=1, max_length=32, description="openai, qwen or gemini")
]
UserFilter = Annotated[
    uuid.UUID | None, Query(alias="userId", description="ADMIN: one user's events")
]
OrgFilter = Annotated[
    uuid.UUID | None, Query(alias="orgId", description="Events charged to one org pool")
]
ModelFilter = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=128,
        description="One catalogue model (events of the OpenAI-compatible /v1 API name one)",
    ),
]
WindowMinutes = Annotated[int, Query(alias="windowMinutes", ge=1, le=1440)]
SeriesWindow = Annotated[
    int,
    Query(
        alias="windowMinutes",
        ge=1,
        le=MAX_SERIES_MINUTES,
        description="60 (1 h), 1440 (24 h), 10080 (7 d) or any width up to 7 days",
    ),
]
AnyProvider = Annotated[
    str | None,
    Query(min_length=1, max_length=32, description="openai, qwen or gemini; omitted: all"),
]


def _service(request: Request) -> AnalyticsService:
    service: AnalyticsService = request.app.state.analytics_service
    return service


@router.get("/health", tags=["health"])
async def health(request: Request) -> HealthRead:
    if not await _service(request).db.ping():
        raise ServiceUnavailable("analytics database unavailable")
    return HealthRead(service="analytics", status="UP", checks={"database": "UP"})


@router.get("/usage", tags=["analytics"])
async def usage(
    request: Request,
    principal: CurrentPrincipal,
    provider: ProviderQuery,
    limit: Annotated[int, Query(ge=1, le=MAX_ITEMS)] = 20,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    cursor: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=200,
            description="A previous answer's `nextCursor`: the page after it, by keyset (as fast "
            "a million events deep as on the first page; `page` is then ignored)",
        ),
    ] = None,
    user_id: UserFilter = None,
    org_id: OrgFilter = None,
    model: ModelFilter = None,
) -> UsageRead:
    """Usage events, newest first: `limit` per page (default 20, at most 200).

    Pages: follow `nextCursor` (present while more events follow) with `cursor=`; `page=N`
    still pages by offset, which grows slower the deeper it goes. `pagination.total` counts at
    most 10 000 events; past that it is 10 000 and `totalExact` is false."""
    return await _service(request).usage(
        principal,
        provider,
        limit=limit,
        page=page,
        cursor=cursor,
        user_id=user_id,
        org_id=org_id,
        model=model,
    )


@router.get("/report", tags=["analytics"])
async def report(
    request: Request,
    principal: CurrentPrincipal,
    provider: ProviderQuery,
    window_minutes: WindowMinutes = 60,
    user_id: UserFilter = None,
    org_id: OrgFilter = None,
    model: ModelFilter = None,
    by_model: Annotated[
        bool,
        Query(
            alias="byModel",
            description="Add `byModel`: per model, events, prompt/completion/total tokens and "
            "p50/p95 latency",
        ),
    ] = False,
) -> ReportRead:
    """Exact totals over the last `windowMinutes` (default 60, at most 1440)."""
    return await _service(request).report(
        principal,
        provider,
        window_minutes=window_minutes,
        user_id=user_id,
        org_id=org_id,
        model=model,
        by_model=by_model,
    )


@router.get("/anomalies", tags=["analytics"])
async def anomalies(
    request: Request,
    principal: CurrentPrincipal,
    provider: ProviderQuery,
    window_minutes: WindowMinutes = 60,
    baseline_windows: Annotated[int, Query(alias="baselineWindows", ge=1, le=24)] = 3,
    threshold: Annotated[float, Query(ge=1.0, le=1_000_000.0, allow_inf_nan=False)] = 2.0,
    user_id: UserFilter = None,
    org_id: OrgFilter = None,
    model: ModelFilter = None,
) -> AnomalyRead:
    """Tokens of the last window against the average of the `baselineWindows` before it;
    `anomaly` when currentTokens >= threshold x max(baselineAverage, 1)."""
    if not math.isfinite(threshold):  # belt and braces: JSON has no Infinity
        threshold = 2.0
    return await _service(request).anomalies(
        principal,
        provider,
        window_minutes=window_minutes,
        baseline_windows=baseline_windows,
        threshold=threshold,
        user_id=user_id,
        org_id=org_id,
        model=model,
    )


@router.get("/timeseries", tags=["analytics"])
async def timeseries(
    request: Request,
    principal: CurrentPrincipal,
    window_minutes: SeriesWindow = 60,
    bucket_seconds: Annotated[
        int | None,
        Query(
            alias="bucketSeconds",
            ge=1,
            le=86_400,
            description="Bucket width; default 60 s up to 1 h, 300 s up to 6 h, 900 s up to "
            "24 h, 3600 s beyond. At most 1000 buckets.",
        ),
    ] = None,
    provider: AnyProvider = None,
    user_id: UserFilter = None,
    org_id: OrgFilter = None,
) -> TimeseriesRead:
    """Requests and tokens (all and allowed) per provider and model in epoch-aligned buckets,
    the last one holding now: exact totals from SQL aggregates, scoped like `/usage` (a USER
    their own events, an ADMIN everyone's or one `userId` / `orgId`)."""
    return await _service(request).timeseries(
        principal,
        provider,
        window_minutes=window_minutes,
        bucket_seconds=bucket_seconds,
        user_id=user_id,
        org_id=org_id,
    )


@router.get("/top", tags=["analytics"])
async def top(
    request: Request,
    principal: CurrentPrincipal,
    window_minutes: SeriesWindow = 60,
    limit: Annotated[int, Query(ge=1, le=50)] = 5,
    provider: AnyProvider = None,
    user_id: UserFilter = None,
    org_id: OrgFilter = None,
    model: ModelFilter = None,
) -> TopRead:
    """The users and organisation pools with most tokens over [now - windowMinutes, now)."""
    return await _service(request).top(
        principal,
        provider,
        window_minutes=window_minutes,
        limit=limit,
        user_id=user_id,
        org_id=org_id,
        model=model,
    )


@router.get("/admin/consumers", tags=["admin"])
async def consumer_lag(request: Request, principal: CurrentPrincipal) -> ConsumerLagRead:
    """ADMIN: events the transports hold that analytics has not stored yet (consumer lag);
    the same figure as `analytics_consumer_lag_events` at `/metrics`."""
    return await _service(request).consumer_lag(principal, request.app.state.consumers)


@router.get("/admin/dead-letters", tags=["admin"])
async def dead_letters(
    request: Request, principal: CurrentPrincipal, paging: PageParams
) -> DeadLettersRead:
    """ADMIN: events kept instead of counted, newest first, with the reason — `invalid`
    (unreadable payload), `failed` (the database refused it alone, twice; found by splitting its
    batch), `late` (from before the rolled-up horizon); counted by
    `analytics_events_dead_lettered_total{stream, reason}` at `/metrics`."""
    return await _service(request).dead_letters(
        principal, page=paging.page, page_size=paging.page_size
    )


@router.get("/purchases", tags=["analytics"])
async def purchases(
    request: Request,
    principal: CurrentPrincipal,
    paging: PageParams,
    saga_id: Annotated[str | None, Query(alias="sagaId", max_length=64)] = None,
    user_id: UserFilter = None,
) -> PurchaseEventsRead:
    """Purchase-saga events (steps and compensations), newest first; never part of usage."""
    return await _service(request).purchases(
        principal,
        saga_id=saga_id,
        user_id=user_id,
        page=paging.page,
        page_size=paging.page_size,
    )
