"""Response bodies of the analytics service: the plan's field names (§6.1-6.3), plus a few
fields added on purpose (marked)."""

from __future__ import annotations

import uuid
from datetime import datetime

from leaky_tokens.shared.pagination import Pagination
from leaky_tokens.shared.schemas import ApiModel


class UsageKey(ApiModel):
    provider: str
    timestamp: datetime


class UsageItem(ApiModel):
    key: UsageKey
    user_id: uuid.UUID
    tokens: int
    allowed: bool
    # added: which decision, which event, which org pool, which request
    decision: str
    event_id: uuid.UUID
    org_id: uuid.UUID | None
    request_id: str | None


class UsageRead(ApiModel):
    provider: str
    count: int  # items in this answer
    items: list[UsageItem]
    pagination: Pagination  # added: contract 12 (page, page_size = limit, total, total_pages)


class TopUser(ApiModel):
    user_id: uuid.UUID
    total_tokens: int
    events: int
    allowed_tokens: int  # added


class TopOrg(ApiModel):
    org_id: uuid.UUID
    total_tokens: int
    events: int
    allowed_tokens: int


class TopRead(ApiModel):
    provider: str | None  # None: every provider
    window_start: datetime
    window_end: datetime
    top_users: list[TopUser]
    top_orgs: list[TopOrg]  # org pools charged (events with an orgId)


class SeriesTotals(ApiModel):
    requests: int
    allowed_requests: int
    refused_requests: int
    tokens: int  # asked for by every event (demand)
    allowed_tokens: int  # of ALLOWED events (charged)


class SeriesRead(ApiModel):
    """One provider (and model, when its events name one); a value per bucket."""

    provider: str
    model: str | None
    requests: list[int]
    allowed_requests: list[int]
    tokens: list[int]
    allowed_tokens: list[int]
    totals: SeriesTotals


class TimeseriesRead(ApiModel):
    provider: str | None  # None: every provider
    window_minutes: int
    bucket_seconds: int
    window_start: datetime  # the first bucket's start
    window_end: datetime  # now (exclusive)
    buckets: list[datetime]  # each bucket's start; the series' arrays follow this order
    series: list[SeriesRead]
    totals: SeriesTotals


class ConsumerLagRead(ApiModel):
    transports: list[str]  # "http" (push; holds nothing in transit) and/or "redis"
    lag: dict[str, int]  # per stream: undelivered + unacknowledged events
    total: int
    measured_at: datetime


class ReportRead(ApiModel):
    provider: str
    window_start: datetime
    window_end: datetime
    total_events: int
    allowed_events: int
    denied_events: int
    total_tokens: int  # tokens asked for by every event in the window (demand)
    allowed_tokens: int  # added: tokens of ALLOWED events (what quotas were charged)
    average_tokens: float  # total_tokens / total_events
    unique_users: int
    sample_limit: int
    top_users: list[TopUser]


class AnomalyRead(ApiModel):
    provider: str
    current_window_start: datetime
    current_window_end: datetime
    window_minutes: int  # added
    baseline_windows: int
    current_tokens: int
    baseline_average: float
    baseline_window_tokens: list[int]  # added: tokens per baseline window, oldest first
    ratio: float
    threshold: float
    anomaly: bool
    sample_limit: int


class PurchaseEventRead(ApiModel):
    event_id: uuid.UUID
    type: str
    saga_id: str
    user_id: uuid.UUID | None
    status: str | None
    tokens: int | None
    occurred_at: datetime
    payload: dict[str, object]


class PurchaseEventsRead(ApiModel):
    items: list[PurchaseEventRead]
    pagination: Pagination
