"""The analytics service's rules: storing events idempotently, and usage, report and anomaly
answers computed exactly over their windows.

What "tokens" means here: every usage event carries the tokens its request asked for, whatever
the decision. `totalTokens`, `topUsers[].totalTokens` and the anomaly figures count the tokens of
every event in the window (demand: a spike shows even while the bucket refuses most of it, and
`averageTokens = totalTokens / totalEvents`, the plan's arithmetic); `allowedTokens` counts only
ALLOWED events, i.e. what quotas were charged.

Who sees what: a USER sees only their own events; an ADMIN sees everyone's and may narrow to one
user (`userId`) and/or one organisation pool (`orgId`).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Protocol

from pydantic import Field, StringConstraints, ValidationError

from leaky_tokens.analytics import anomalies
from leaky_tokens.analytics.errors import ForeignUsage, TooManyBuckets, UnknownProvider
from leaky_tokens.analytics.repository import (
    AnalyticsRepository,
    BucketTotals,
    ModelTotals,
    OwnerTotals,
    UsageFilter,
)
from leaky_tokens.analytics.schemas import (
    AnomalyRead,
    ConsumerLagRead,
    DeadLetterRead,
    DeadLettersRead,
    ModelReport,
    PurchaseEventRead,
    PurchaseEventsRead,
    ReportRead,
    SeriesRead,
    SeriesTotals,
    TimeseriesRead,
    TopOrg,
    TopRead,
    TopUser,
    UsageItem,
    UsageKey,
    UsageRead,
)
from leaky_tokens.settings import PROVIDERS
from leaky_tokens.shared.clock import Clock
from leaky_tokens.shared.database import Database
from leaky_tokens.shared.errors import Forbidden, InvalidRequest
from leaky_tokens.shared.events import Event
from leaky_tokens.shared.pagination import Pagination
from leaky_tokens.shared.principal import Principal
from leaky_tokens.shared.schemas import ApiModel

log = logging.getLogger("leaky_tokens.analytics")

USAGE = "usage"
PURCHASE = "purchase"
# The most rows an item list answers (/usage `limit`); reported as `sampleLimit`. Aggregates
# never sample: they are computed by the database over every event in the window.
MAX_ITEMS = 200
TOP_USERS = 5
# The time series: at most this wide (7 days) and this many buckets per answer.
MAX_SERIES_MINUTES = 7 * 24 * 60
MAX_BUCKETS = 1000


# /usage counts its `total` up to this many events (then `totalExact: false`): a COUNT(*) over
# millions of rows would cost a scan of them all on every page.
COUNT_BOUND = 10_000


@dataclass(frozen=True, slots=True)
class UsageCursor:
    """Where the next /usage page starts: after the event (occurred_at, id), numbered `page`."""

    occurred_at: datetime
    row_id: int
    page: int


def encode_cursor(cursor: UsageCursor) -> str:
    """Opaque to clients (base64url of a small JSON)."""
    raw = json.dumps(
        {"t": cursor.occurred_at.isoformat(), "i": cursor.row_id, "p": cursor.page},
        separators=(",", ":"),
    ).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> UsageCursor:
    try:
        raw = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        at = datetime.fromisoformat(raw["t"])
        row_id, page = raw["i"], raw["p"]
        if at.tzinfo is None or not isinstance(row_id, int) or not isinstance(page, int):
            raise ValueError("malformed")
        if not (0 <= row_id < 2**63 and 1 <= page <= 10**9):
            raise ValueError("out of range")
        return UsageCursor(at.astimezone(UTC), row_id, page)
    except (ValueError, TypeError, KeyError, json.JSONDecodeError, binascii.Error):
        message = "not a cursor this service gave (pass a previous answer's nextCursor)"
        raise InvalidRequest(message, details=[{"field": "cursor", "message": message}]) from None


def default_bucket_seconds(window_minutes: int) -> int:
    """A chart's worth of buckets (60-168) for the usual windows: 1 h by the minute, 24 h by the
    quarter hour, 7 d by the hour."""
    if window_minutes <= 60:
        return 60
    if window_minutes <= 360:
        return 300
    if window_minutes <= 1440:
        return 900
    return 3600


def bucket_bounds(now: datetime, window_minutes: int, bucket_seconds: int) -> tuple[int, int]:
    """(first, count): the epoch-aligned buckets that cover [now - window, now), the first one
    holding now - window and the last one now (a bucket starting at now would be empty, so it
    is left out). Too many buckets for one answer is the caller's error."""
    seconds = int(now.timestamp() // 1)
    first = (seconds - window_minutes * 60) // bucket_seconds
    last = seconds // bucket_seconds
    if seconds % bucket_seconds == 0 and now.microsecond == 0:
        last -= 1
    count = last - first + 1
    if count > MAX_BUCKETS:
        message = (
            f"{count} buckets of {bucket_seconds} s for {window_minutes} min; "
            f"at most {MAX_BUCKETS} per answer"
        )
        raise TooManyBuckets(message, details=[{"field": "bucketSeconds", "message": message}])
    return first, count


class UsagePayload(ApiModel):
    """The fields of a usage event analytics relies on (others are kept as details)."""

    decision: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    allowed: bool | None = None
    user_id: uuid.UUID
    org_id: uuid.UUID | None = None
    provider: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    tokens: Annotated[int, Field(ge=0, le=2**62)]
    request_id: Annotated[str, StringConstraints(max_length=128)] | None = None
    # calls of the OpenAI-compatible API (/v1); /consume events have none of these
    model: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    prompt_tokens: Annotated[int, Field(ge=0, le=2**62)] | None = None
    completion_tokens: Annotated[int, Field(ge=0, le=2**62)] | None = None
    latency_ms: Annotated[int, Field(ge=0, le=2**62)] | None = None


_USAGE_COLUMNS = {
    "eventId",
    "type",
    "decision",
    "allowed",
    "userId",
    "orgId",
    "provider",
    "tokens",
    "occurredAt",
    "requestId",
    "model",
    "promptTokens",
    "completionTokens",
    "latencyMs",
}


@dataclass(frozen=True, slots=True)
class StoredCounts:
    received: int
    stored: int
    duplicates: int
    rejected: int  # unreadable payloads (dead-lettered as `invalid`)
    ignored: int
    dead_lettered: int = 0  # newly dead-lettered (every reason)


@dataclass(frozen=True, slots=True)
class _Item:
    """One event of a batch, ready for its table (or with the reason it has none)."""

    event: Event
    usage: dict[str, Any] | None = None
    purchase: dict[str, Any] | None = None
    invalid: str | None = None


@dataclass(slots=True)
class _Tally:
    usage: int = 0  # usage events stored (first delivery)
    purchases: int = 0
    invalid: int = 0
    uncounted: int = 0  # readable events dead-lettered (late, failed), stored nowhere else
    dead: dict[tuple[str, str], int] = field(default_factory=dict)  # newly dead, per reason

    def __add__(self, other: _Tally) -> _Tally:
        dead = dict(self.dead)
        for key, count in other.dead.items():
            dead[key] = dead.get(key, 0) + count
        return _Tally(
            self.usage + other.usage,
            self.purchases + other.purchases,
            self.invalid + other.invalid,
            self.uncounted + other.uncounted,
            dead,
        )


def _dead_letter(event: Event, reason: str, error: str, now: datetime) -> dict[str, Any]:
    """A dead-letter row: text made safe for every database (no NUL; the event as ASCII JSON)."""
    return {
        "event_id": event.event_id,
        "stream": event.stream,
        "event_type": event.type.replace("\x00", "")[:64],
        "reason": reason,
        "error": error.replace("\x00", "\\0")[:2000],
        "event": json.dumps(event.to_wire(), ensure_ascii=True, default=str),
        "occurred_at": event.occurred_at,
        "dead_at": now,
    }


class IngestObserver:
    """What the service reports about ingestion (metrics); the default reports nothing."""

    def batch(self, stream: str, received: int, stored: int, rejected: int) -> None:
        return None

    def delay(self, seconds: float) -> None:
        return None

    def dead_lettered(self, stream: str, reason: str, count: int) -> None:
        return None


def check_provider(provider: str) -> str:
    name = provider.strip().lower()
    if name not in PROVIDERS:
        message = f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}"
        raise UnknownProvider(message, details=[{"field": "provider", "message": message}])
    return name


def scope_for(
    principal: Principal,
    provider: str | None,
    user_id: uuid.UUID | None,
    org_id: uuid.UUID | None,
    model: str | None = None,
) -> UsageFilter:
    """What the caller may see: a USER their own events, an ADMIN everyone's or a pick.
    `provider` None means every provider; `model` None every model (and events naming none)."""
    if provider is not None:
        provider = check_provider(provider)
    if principal.is_admin:
        return UsageFilter(provider, user_id, org_id, model)
    if user_id is not None and user_id != principal.user_id:
        raise ForeignUsage()
    return UsageFilter(provider, principal.user_id, org_id, model)


def _usage_row(event: Event, now: datetime) -> tuple[dict[str, Any] | None, str | None]:
    """The usage_event row of an event, or why it cannot have one."""
    try:
        usage = UsagePayload.model_validate(event.payload)
    except ValidationError as exc:
        log.error("dead-lettering unreadable usage event %s: %s", event.event_id, str(exc)[:300])
        return None, str(exc)
    details = {k: v for k, v in event.payload.items() if k not in _USAGE_COLUMNS}
    return {
        "event_id": event.event_id,
        "event_type": event.type,
        "decision": usage.decision,
        "allowed": usage.allowed if usage.allowed is not None else usage.decision == "ALLOWED",
        "user_id": usage.user_id,
        "org_id": usage.org_id,
        "provider": usage.provider,
        "tokens": usage.tokens,
        "occurred_at": event.occurred_at,
        "request_id": usage.request_id,
        "model": usage.model,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "latency_ms": usage.latency_ms,
        "details": details,
        "received_at": now,
    }, None


def _purchase_row(event: Event, now: datetime) -> dict[str, Any]:
    payload = event.payload
    user_id: uuid.UUID | None = None
    try:
        user_id = uuid.UUID(str(payload["userId"])) if payload.get("userId") else None
    except ValueError:
        user_id = None
    tokens = payload.get("tokens")
    status = payload.get("status")
    return {
        "event_id": event.event_id,
        "event_type": event.type,
        "saga_id": str(payload.get("sagaId") or event.aggregate_id)[:64],
        "user_id": user_id,
        "status": str(status)[:32] if status is not None else None,
        "tokens": tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None,
        "occurred_at": event.occurred_at,
        "payload": payload,
        "received_at": now,
    }


def _rounded(value: float) -> float:
    return round(value, 2) if math.isfinite(value) else 0.0


class LagSource(Protocol):
    """Where analytics' event transports report what they hold but have not delivered."""

    transports: tuple[str, ...]

    async def lag(self) -> dict[str, int]: ...


def _series(
    rows: Sequence[BucketTotals], first: int, count: int
) -> tuple[list[SeriesRead], SeriesTotals]:
    """One series per (provider, model), a value per bucket (zero where no event fell)."""
    arrays: dict[tuple[str, str | None], list[list[int]]] = {}
    for row in rows:
        key = (row.provider, row.model)
        values = arrays.setdefault(key, [[0] * count for _ in range(4)])
        index = row.bucket - first
        values[0][index] += row.events
        values[1][index] += row.allowed_events
        values[2][index] += row.tokens
        values[3][index] += row.allowed_tokens
    series = []
    for (provider, model), (requests, allowed, tokens, allowed_tokens) in sorted(
        arrays.items(), key=lambda item: (item[0][0], item[0][1] or "")
    ):
        series.append(
            SeriesRead(
                provider=provider,
                model=model,
                requests=requests,
                allowed_requests=allowed,
                tokens=tokens,
                allowed_tokens=allowed_tokens,
                totals=_totals(sum(requests), sum(allowed), sum(tokens), sum(allowed_tokens)),
            )
        )
    overall = _totals(
        sum(s.totals.requests for s in series),
        sum(s.totals.allowed_requests for s in series),
        sum(s.totals.tokens for s in series),
        sum(s.totals.allowed_tokens for s in series),
    )
    return series, overall


def _top_users(users: Sequence[OwnerTotals]) -> list[TopUser]:
    return [
        TopUser(
            user_id=u.owner_id,
            total_tokens=u.tokens,
            events=u.events,
            allowed_tokens=u.allowed_tokens,
        )
        for u in users
    ]


def _model_report(m: ModelTotals) -> ModelReport:
    return ModelReport(
        model=m.model,
        total_events=m.events,
        allowed_events=m.allowed_events,
        total_tokens=m.tokens,
        allowed_tokens=m.allowed_tokens,
        prompt_tokens=m.prompt_tokens,
        completion_tokens=m.completion_tokens,
        p50_latency_ms=m.p50_latency_ms,
        p95_latency_ms=m.p95_latency_ms,
    )


def _totals(requests: int, allowed: int, tokens: int, allowed_tokens: int) -> SeriesTotals:
    return SeriesTotals(
        requests=requests,
        allowed_requests=allowed,
        refused_requests=requests - allowed,
        tokens=tokens,
        allowed_tokens=allowed_tokens,
    )


class AnalyticsService:
    def __init__(
        self, database: Database, clock: Clock, observer: IngestObserver | None = None
    ) -> None:
        self.db = database
        self.clock = clock
        self.observer = observer or IngestObserver()

    # ingestion

    async def store_events(self, batch: Sequence[Event]) -> StoredCounts:
        """Store a batch: usage and purchase events in their own tables, each event id once (a
        redelivery is skipped); other streams are ignored. What cannot be counted goes to the
        dead-letter table with its reason, and the batch is answered as handled, so the stream
        moves on: an unreadable payload (`invalid`), an event older than the rolled-up horizon
        (`late`), an event the database refuses (`failed`, found by splitting the batch)."""
        now = self.clock.now()
        seen: set[uuid.UUID] = set()
        items: list[_Item] = []
        ignored = 0
        for event in batch:
            if event.event_id in seen:
                continue
            seen.add(event.event_id)
            if event.stream == USAGE:
                row, error = _usage_row(event, now)
                items.append(_Item(event, usage=row, invalid=error))
                if row is not None:
                    self.observer.delay(max(0.0, (now - event.occurred_at).total_seconds()))
            elif event.stream == PURCHASE:
                items.append(_Item(event, purchase=_purchase_row(event, now)))
            else:
                ignored += 1
        tally = await self._store_isolating(items, now)
        usage_received = sum(1 for i in items if i.event.stream == USAGE)
        self.observer.batch(USAGE, usage_received, tally.usage, tally.invalid)
        self.observer.batch(PURCHASE, len(items) - usage_received, tally.purchases, 0)
        for (stream, reason), count in tally.dead.items():
            self.observer.dead_lettered(stream, reason, count)
        stored = tally.usage + tally.purchases
        not_counted = sum(1 for i in items if i.invalid is None) - stored - tally.uncounted
        return StoredCounts(
            received=len(batch),
            stored=stored,
            duplicates=len(batch) - len(items) - ignored + not_counted,
            rejected=tally.invalid,
            ignored=ignored,
            dead_lettered=sum(tally.dead.values()),
        )

    async def _store_isolating(self, items: list[_Item], now: datetime) -> _Tally:
        """Store the items in one transaction; when that fails, store each half on its own, down
        to single events. A single event the database refuses twice while it accepts its
        dead letter is poison: dead-lettered, and the rest of the batch is stored. When the
        database refuses everything (it is down), the error propagates and the transport
        delivers the batch again later (the stored part is then skipped as duplicates)."""
        try:
            return await self._store(items, now)
        except Exception as exc:
            if len(items) > 1:
                log.warning(
                    "a batch of %d events failed (%s: %s); storing it in halves",
                    len(items),
                    type(exc).__name__,
                    str(exc)[:200],
                )
                middle = len(items) // 2
                first = await self._store_isolating(items[:middle], now)
                return first + await self._store_isolating(items[middle:], now)
        try:
            return await self._store(items, now)  # a lone event gets a second chance
        except Exception as exc:
            return await self._dead_letter_failed(items[0].event, exc, now)

    async def _store(self, items: list[_Item], now: datetime) -> _Tally:
        tally = _Tally()
        async with self.db.transaction() as session:
            repo = AnalyticsRepository(session)
            horizon = await repo.rollup_horizon(lock="share")
            usage: list[dict[str, Any]] = []
            invalid: list[dict[str, Any]] = []
            late: list[dict[str, Any]] = []
            for item in items:
                if item.invalid is not None:
                    invalid.append(_dead_letter(item.event, "invalid", item.invalid, now))
                elif item.usage is not None:
                    if horizon is not None and item.event.occurred_at < horizon:
                        message = f"occurred before the rolled-up horizon {horizon.isoformat()}"
                        late.append(_dead_letter(item.event, "late", message, now))
                    else:
                        usage.append(item.usage)
            purchases = [i.purchase for i in items if i.purchase is not None]
            tally.usage = await repo.insert_usage(usage)
            tally.purchases = await repo.insert_purchases(purchases)
            tally.invalid = len(invalid)
            tally.uncounted = len(late)
            for reason, rows in (("invalid", invalid), ("late", late)):
                if rows and (count := await repo.insert_dead_letters(rows)):
                    tally.dead[(USAGE, reason)] = count
        return tally

    async def _dead_letter_failed(self, event: Event, exc: Exception, now: datetime) -> _Tally:
        error = f"{type(exc).__name__}: {exc}"
        async with self.db.transaction() as session:  # raises when the database is down
            stored = await AnalyticsRepository(session).insert_dead_letters(
                [_dead_letter(event, "failed", error, now)]
            )
        log.error("dead-lettered event %s of stream %s: %s", event.event_id, event.stream, error)
        tally = _Tally(uncounted=1)
        if stored:
            tally.dead[(event.stream, "failed")] = stored
        return tally

    # queries

    async def usage(
        self,
        principal: Principal,
        provider: str,
        *,
        limit: int,
        page: int = 1,
        cursor: str | None = None,
        user_id: uuid.UUID | None = None,
        org_id: uuid.UUID | None = None,
        model: str | None = None,
    ) -> UsageRead:
        """The newest events first; `limit` items per page. A `cursor` (a previous answer's
        `nextCursor`) continues after that answer's last item, by keyset; without one, `page`
        pages by offset as before. `total` is counted up to COUNT_BOUND."""
        scope = scope_for(principal, provider, user_id, org_id, model)
        limit = max(1, min(limit, MAX_ITEMS))
        position = decode_cursor(cursor) if cursor is not None else None
        if position is not None:
            page = position.page
        async with self.db.read() as session:
            repo = AnalyticsRepository(session)
            if position is not None:
                rows = await repo.recent_usage(
                    scope, limit + 1, after=(position.occurred_at, position.row_id)
                )
            else:
                rows = await repo.recent_usage(scope, limit + 1, (page - 1) * limit)
            total = await repo.count_usage(scope, COUNT_BOUND)
        more = len(rows) > limit
        rows = rows[:limit]
        exact = total <= COUNT_BOUND
        total = min(total, COUNT_BOUND)
        items = [
            UsageItem(
                key=UsageKey(provider=row.provider, timestamp=row.occurred_at),
                user_id=row.user_id,
                tokens=row.tokens,
                allowed=row.allowed,
                decision=row.decision,
                event_id=row.event_id,
                org_id=row.org_id,
                request_id=row.request_id,
                model=row.model,
                prompt_tokens=row.prompt_tokens,
                completion_tokens=row.completion_tokens,
                latency_ms=row.latency_ms,
            )
            for row in rows
        ]
        next_cursor = (
            encode_cursor(UsageCursor(rows[-1].occurred_at, rows[-1].id, page + 1))
            if more and rows
            else None
        )
        return UsageRead(
            provider=scope.provider,
            count=len(items),
            items=items,
            pagination=Pagination.of(page, limit, total),
            next_cursor=next_cursor,
            total_exact=None if exact else False,
            model=scope.model,
        )

    async def report(
        self,
        principal: Principal,
        provider: str,
        *,
        window_minutes: int,
        user_id: uuid.UUID | None = None,
        org_id: uuid.UUID | None = None,
        model: str | None = None,
        by_model: bool = False,
    ) -> ReportRead:
        """Totals over [now - windowMinutes, now); with `by_model`, also per model."""
        scope = scope_for(principal, provider, user_id, org_id, model)
        end = self.clock.now()
        start = end - timedelta(minutes=window_minutes)
        models: list[ModelTotals] | None = None
        async with self.db.read() as session:
            repo = AnalyticsRepository(session)
            totals = await repo.window_totals(scope, start, end)
            top = await repo.top_users(scope, start, end, TOP_USERS)
            if by_model:
                models = await repo.by_model(scope, start, end)
        return ReportRead(
            provider=scope.provider,
            window_start=start,
            window_end=end,
            total_events=totals.events,
            allowed_events=totals.allowed_events,
            denied_events=totals.events - totals.allowed_events,
            total_tokens=totals.tokens,
            allowed_tokens=totals.allowed_tokens,
            average_tokens=_rounded(totals.tokens / totals.events) if totals.events else 0.0,
            unique_users=totals.unique_users,
            sample_limit=MAX_ITEMS,
            top_users=_top_users(top),
            model=scope.model,
            by_model=None if models is None else [_model_report(m) for m in models],
        )

    async def anomalies(
        self,
        principal: Principal,
        provider: str,
        *,
        window_minutes: int,
        baseline_windows: int,
        threshold: float,
        user_id: uuid.UUID | None = None,
        org_id: uuid.UUID | None = None,
        model: str | None = None,
    ) -> AnomalyRead:
        """Tokens of [now - w, now) against the average of the `baselineWindows` windows of the
        same width before it (see anomalies.py for the rule and the zero-baseline ratio); with
        `model`, of that model's events only."""
        scope = scope_for(principal, provider, user_id, org_id, model)
        windows = anomalies.windows_ending_at(
            self.clock.now(), timedelta(minutes=window_minutes), baseline_windows
        )
        async with self.db.read() as session:
            per_window = await AnalyticsRepository(session).tokens_per_window(
                scope, [*windows.baseline, (windows.current_start, windows.end)]
            )
        baseline, current = per_window[:-1], per_window[-1]
        verdict = anomalies.judge(current, baseline, threshold)
        return AnomalyRead(
            provider=scope.provider,
            current_window_start=windows.current_start,
            current_window_end=windows.end,
            window_minutes=window_minutes,
            baseline_windows=baseline_windows,
            current_tokens=verdict.current_tokens,
            baseline_average=_rounded(verdict.baseline_average),
            baseline_window_tokens=baseline,
            ratio=_rounded(verdict.ratio),
            threshold=threshold,
            anomaly=verdict.anomaly,
            sample_limit=MAX_ITEMS,
            model=scope.model,
        )

    async def timeseries(
        self,
        principal: Principal,
        provider: str | None,
        *,
        window_minutes: int,
        bucket_seconds: int | None = None,
        user_id: uuid.UUID | None = None,
        org_id: uuid.UUID | None = None,
    ) -> TimeseriesRead:
        """Requests and tokens (all / allowed) per provider and model in epoch-aligned buckets
        covering the window; exact (every event in [first bucket's start, now) counted once)."""
        scope = scope_for(principal, provider, user_id, org_id)
        size = bucket_seconds or default_bucket_seconds(window_minutes)
        end = self.clock.now()
        first, count = bucket_bounds(end, window_minutes, size)
        start = datetime.fromtimestamp(first * size, UTC)
        async with self.db.read() as session:
            rows = await AnalyticsRepository(session).usage_timeseries(scope, start, end, size)
        series, totals = _series(rows, first, count)
        return TimeseriesRead(
            provider=scope.provider,
            window_minutes=window_minutes,
            bucket_seconds=size,
            window_start=start,
            window_end=end,
            buckets=[start + timedelta(seconds=i * size) for i in range(count)],
            series=series,
            totals=totals,
        )

    async def top(
        self,
        principal: Principal,
        provider: str | None,
        *,
        window_minutes: int,
        limit: int = TOP_USERS,
        user_id: uuid.UUID | None = None,
        org_id: uuid.UUID | None = None,
        model: str | None = None,
    ) -> TopRead:
        """The users and the organisation pools that asked for most tokens in [now - w, now)."""
        scope = scope_for(principal, provider, user_id, org_id, model)
        end = self.clock.now()
        start = end - timedelta(minutes=window_minutes)
        async with self.db.read() as session:
            repo = AnalyticsRepository(session)
            users = await repo.top_users(scope, start, end, limit)
            orgs = await repo.top_orgs(scope, start, end, limit)
        return TopRead(
            provider=scope.provider,
            window_start=start,
            window_end=end,
            top_users=_top_users(users),
            top_orgs=[
                TopOrg(
                    org_id=o.owner_id,
                    total_tokens=o.tokens,
                    events=o.events,
                    allowed_tokens=o.allowed_tokens,
                )
                for o in orgs
            ],
            model=scope.model,
        )

    async def consumer_lag(self, principal: Principal, source: LagSource) -> ConsumerLagRead:
        """ADMIN: per stream, the events a transport holds that analytics has not stored yet."""
        if not principal.is_admin:
            raise Forbidden("only an ADMIN may read the event pipeline's state")
        lag = await source.lag()
        return ConsumerLagRead(
            transports=list(source.transports),
            lag={stream: lag.get(stream, 0) for stream in (USAGE, PURCHASE)},
            total=sum(lag.values()),
            measured_at=self.clock.now(),
        )

    async def purchases(
        self,
        principal: Principal,
        *,
        saga_id: str | None,
        user_id: uuid.UUID | None,
        page: int,
        page_size: int,
    ) -> PurchaseEventsRead:
        """Purchase-saga events, newest first: a USER's own, an ADMIN's pick."""
        if not principal.is_admin:
            if user_id is not None and user_id != principal.user_id:
                raise ForeignUsage("you may only read your own purchases")
            user_id = principal.user_id
        async with self.db.read() as session:
            rows, total = await AnalyticsRepository(session).purchases(
                saga_id=saga_id, user_id=user_id, limit=page_size, offset=(page - 1) * page_size
            )
        return PurchaseEventsRead(
            items=[
                PurchaseEventRead(
                    event_id=r.event_id,
                    type=r.event_type,
                    saga_id=r.saga_id,
                    user_id=r.user_id,
                    status=r.status,
                    tokens=r.tokens,
                    occurred_at=r.occurred_at,
                    payload=r.payload,
                )
                for r in rows
            ],
            pagination=Pagination.of(page, page_size, total),
        )

    async def dead_letters(
        self, principal: Principal, *, page: int, page_size: int
    ) -> DeadLettersRead:
        """ADMIN: the events analytics could not count, newest first."""
        if not principal.is_admin:
            raise Forbidden("only an ADMIN may read dead-lettered events")
        async with self.db.read() as session:
            rows, total = await AnalyticsRepository(session).dead_letters(
                page_size, (page - 1) * page_size
            )
        return DeadLettersRead(
            items=[
                DeadLetterRead(
                    event_id=r.event_id,
                    stream=r.stream,
                    type=r.event_type,
                    reason=r.reason,
                    error=r.error,
                    event=r.event,
                    occurred_at=r.occurred_at,
                    dead_at=r.dead_at,
                )
                for r in rows
            ],
            pagination=Pagination.of(page, page_size, total),
        )

    async def usage_totals(self) -> tuple[int, int]:
        async with self.db.read() as session:
            return await AnalyticsRepository(session).usage_totals()
