"""Response bodies of the analytics service: the plan's field names (§6.1-6.3), plus a few
fields added on purpose (marked)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import ClassVar

from pydantic import SerializerFunctionWrapHandler, model_serializer
from pydantic.alias_generators import to_camel

from leaky_tokens.shared.pagination import Pagination
from leaky_tokens.shared.schemas import ApiModel


class SparseModel(ApiModel):
    """A body whose optional additions are left out while empty, so the plan's shapes stay
    exactly as they were for the answers that have nothing to add (e.g. /consume events name no
    model; a last page has no next cursor)."""

    omit_when_none: ClassVar[frozenset[str]] = frozenset()

    # No return annotation on purpose: with one, pydantic documents the body as that type (an
    # empty schema for Any) instead of the model's fields.
    @model_serializer(mode="wrap")
    def _omit_empty_additions(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        data = handler(self)
        if isinstance(data, dict):
            for name in self.omit_when_none:
                for key in (name, to_camel(name)):
                    if key in data and data[key] is None:
                        del data[key]
        return data


class UsageKey(ApiModel):
    provider: str
    timestamp: datetime


class UsageItem(SparseModel):
    omit_when_none = frozenset({"model", "prompt_tokens", "completion_tokens", "latency_ms"})

    key: UsageKey
    user_id: uuid.UUID
    tokens: int
    allowed: bool
    # added: which decision, which event, which org pool, which request
    decision: str
    event_id: uuid.UUID
    org_id: uuid.UUID | None
    request_id: str | None
    # added, present when the event has them (calls of the OpenAI-compatible /v1 API)
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: int | None = None


class UsageRead(SparseModel):
    omit_when_none = frozenset({"next_cursor", "total_exact", "model"})

    provider: str
    count: int  # items in this answer
    items: list[UsageItem]
    # added: contract 12 (page, page_size = limit, total, total_pages); `total` is counted up to
    # a bound (see total_exact)
    pagination: Pagination
    # added: pass as `cursor` for the next page (keyset: fast at any depth); absent on the last
    next_cursor: str | None = None
    # added, present when the total was not counted to its end: `total` is then a lower bound
    total_exact: bool | None = None
    model: str | None = None  # added, present when filtered by model


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


class TopRead(SparseModel):
    omit_when_none = frozenset({"model"})

    provider: str | None  # None: every provider
    window_start: datetime
    window_end: datetime
    top_users: list[TopUser]
    top_orgs: list[TopOrg]  # org pools charged (events with an orgId)
    model: str | None = None  # added, present when filtered by model


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
    series: list[SeriesRead]  # one per (provider, model)
    totals: SeriesTotals


class ConsumerLagRead(ApiModel):
    transports: list[str]  # "http" (push; holds nothing in transit) and/or "redis"
    lag: dict[str, int]  # per stream: undelivered + unacknowledged events
    total: int
    measured_at: datetime


class ModelReport(ApiModel):
    """One model's share of a report window (`model` null: events naming no model, /consume)."""

    model: str | None
    total_events: int
    allowed_events: int
    total_tokens: int
    allowed_tokens: int
    prompt_tokens: int
    completion_tokens: int
    # nearest-rank percentiles over the raw events that report a latency (null: none do)
    p50_latency_ms: int | None
    p95_latency_ms: int | None


class ReportRead(SparseModel):
    omit_when_none = frozenset({"model", "by_model"})

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
    model: str | None = None  # added, present when filtered by model
    by_model: list[ModelReport] | None = None  # added, present when asked (byModel=true)


class AnomalyRead(SparseModel):
    omit_when_none = frozenset({"model"})

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
    model: str | None = None  # added, present when asked per model


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


class DeadLetterRead(ApiModel):
    event_id: uuid.UUID
    stream: str
    type: str
    reason: str  # invalid | failed | late
    error: str
    event: str  # the event as it came (JSON), to inspect or replay by hand
    occurred_at: datetime
    dead_at: datetime


class DeadLettersRead(ApiModel):
    items: list[DeadLetterRead]
    pagination: Pagination
