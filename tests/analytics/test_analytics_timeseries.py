"""GET /api/v1/analytics/timeseries and /top (the dashboard's usage and leader views): exact
bucketed totals scoped like /usage, on SQLite and PostgreSQL, and the ADMIN-only consumer lag."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from tests.analytics.analytics_harness import (
    NOW,
    AnalyticsClient,
    assert_error,
    bearer,
    minutes,
    usage_event,
)

ADMIN = bearer(uuid.uuid4(), admin=True)
SERIES_FIELDS = {
    "provider",
    "model",
    "requests",
    "allowedRequests",
    "tokens",
    "allowedTokens",
    "totals",
}


def _series(body: dict, provider: str, model: str | None = None) -> dict:
    found = [s for s in body["series"] if s["provider"] == provider and s["model"] == model]
    assert len(found) == 1, body["series"]
    return found[0]


async def test_buckets_are_epoch_aligned_and_cover_the_window(analytics: AnalyticsClient) -> None:
    body = await analytics.ok("timeseries", ADMIN, windowMinutes=60)
    # NOW is 12:00:00 exactly: sixty one-minute buckets, 11:00 .. 11:59, none starting at now.
    assert body["bucketSeconds"] == 60
    assert body["windowStart"] == "2026-03-01T11:00:00Z"
    assert body["windowEnd"] == "2026-03-01T12:00:00Z"
    assert len(body["buckets"]) == 60
    assert body["buckets"][0] == "2026-03-01T11:00:00Z"
    assert body["buckets"][-1] == "2026-03-01T11:59:00Z"
    assert body["series"] == []
    assert body["totals"] == {
        "requests": 0,
        "allowedRequests": 0,
        "refusedRequests": 0,
        "tokens": 0,
        "allowedTokens": 0,
    }
    analytics.clock.advance(30)  # 12:00:30: one more (partial) bucket holds now
    body = await analytics.ok("timeseries", ADMIN, windowMinutes=60)
    assert len(body["buckets"]) == 61
    assert body["buckets"][-1] == "2026-03-01T12:00:00Z"


@pytest.mark.parametrize(
    ("window", "bucket", "count"),
    [(60, 60, 60), (360, 300, 72), (1440, 900, 96), (10080, 3600, 168)],
)
async def test_default_bucket_width_follows_the_window(
    analytics: AnalyticsClient, window: int, bucket: int, count: int
) -> None:
    body = await analytics.ok("timeseries", ADMIN, windowMinutes=window)
    assert (body["bucketSeconds"], len(body["buckets"])) == (bucket, count)


async def test_each_event_counts_once_in_its_half_open_bucket(analytics: AnalyticsClient) -> None:
    user = uuid.uuid4()
    edge = NOW - minutes(10)  # 11:50:00, a bucket's first instant
    events = [
        usage_event(user, 1, edge),  # -> 11:50
        usage_event(user, 2, edge - timedelta(microseconds=1)),  # 11:49:59.999999 -> 11:49
        usage_event(user, 4, edge - timedelta(microseconds=400)),  # -> 11:49 (not rounded up)
        usage_event(user, 8, NOW - minutes(60)),  # 11:00:00, the window's first instant
        usage_event(user, 16, NOW - minutes(60) - timedelta(microseconds=1)),  # before: out
        usage_event(user, 32, NOW),  # now: the window is [start, now), out
        usage_event(user, 64, NOW - timedelta(microseconds=1)),  # -> 11:59
    ]
    await analytics.store(*events)
    body = await analytics.ok("timeseries", ADMIN, windowMinutes=60)
    openai = _series(body, "openai")
    assert openai.keys() == SERIES_FIELDS
    by_bucket = {b: t for b, t in zip(body["buckets"], openai["tokens"], strict=True) if t}
    assert by_bucket == {
        "2026-03-01T11:00:00Z": 8,
        "2026-03-01T11:49:00Z": 6,
        "2026-03-01T11:50:00Z": 1,
        "2026-03-01T11:59:00Z": 64,
    }
    assert openai["totals"]["tokens"] == 79 == sum(openai["tokens"])
    assert openai["totals"]["requests"] == 5 == sum(openai["requests"])
    # The same window as /report: the same exact totals.
    report = await analytics.ok("report", ADMIN, provider="openai", windowMinutes=60)
    assert (report["totalTokens"], report["totalEvents"]) == (79, 5)


async def test_series_per_provider_and_model_with_allowed_and_refused(
    analytics: AnalyticsClient,
) -> None:
    user = uuid.uuid4()
    at = NOW - minutes(5)
    await analytics.store(
        usage_event(user, 100, at),
        usage_event(user, 50, at, decision="RATE_LIMITED"),
        usage_event(user, 30, at, decision="QUOTA_INSUFFICIENT"),
        usage_event(user, 7, at, provider="qwen"),
        usage_event(user, 11, at, model="gpt-4o-mini"),
        usage_event(user, 13, at - minutes(1), model="gpt-4o-mini"),
    )
    body = await analytics.ok("timeseries", ADMIN, windowMinutes=60)
    assert [(s["provider"], s["model"]) for s in body["series"]] == [
        ("openai", None),
        ("openai", "gpt-4o-mini"),
        ("qwen", None),
    ]
    plain = _series(body, "openai")
    assert plain["totals"] == {
        "requests": 3,
        "allowedRequests": 1,
        "refusedRequests": 2,
        "tokens": 180,
        "allowedTokens": 100,
    }
    index = body["buckets"].index("2026-03-01T11:55:00Z")
    assert (plain["requests"][index], plain["allowedRequests"][index]) == (3, 1)
    model = _series(body, "openai", "gpt-4o-mini")
    assert model["totals"]["tokens"] == 24
    assert (model["tokens"][index - 1], model["tokens"][index]) == (13, 11)
    assert body["totals"]["tokens"] == 180 + 24 + 7
    only_qwen = await analytics.ok("timeseries", ADMIN, windowMinutes=60, provider="qwen")
    assert only_qwen["provider"] == "qwen"
    assert [s["provider"] for s in only_qwen["series"]] == ["qwen"]


async def test_a_user_sees_only_their_own_series(analytics: AnalyticsClient) -> None:
    alice, bob, org = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    at = NOW - minutes(3)
    await analytics.store(
        usage_event(alice, 10, at),
        usage_event(alice, 5, at, org_id=org),
        usage_event(bob, 1000, at),
        usage_event(bob, 2000, at, org_id=org),
    )
    mine = await analytics.ok("timeseries", bearer(alice), windowMinutes=60)
    assert mine["totals"]["tokens"] == 15
    # An org filter narrows a USER's own events; it never widens them to the org's.
    org_view = await analytics.ok("timeseries", bearer(alice), windowMinutes=60, orgId=str(org))
    assert org_view["totals"]["tokens"] == 5
    assert_error(
        await analytics.get("timeseries", bearer(alice), windowMinutes=60, userId=str(bob)),
        403,
        "FORBIDDEN",
    )
    everyone = await analytics.ok("timeseries", ADMIN, windowMinutes=60)
    assert everyone["totals"]["tokens"] == 3015
    one = await analytics.ok("timeseries", ADMIN, windowMinutes=60, userId=str(bob))
    assert one["totals"]["tokens"] == 3000


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"windowMinutes": 10081}, "windowMinutes"),
        ({"windowMinutes": 0}, "windowMinutes"),
        ({"windowMinutes": 10080, "bucketSeconds": 60}, "bucketSeconds"),  # 10081 buckets
        ({"bucketSeconds": 0}, "bucketSeconds"),
        ({"provider": "nope"}, "provider"),
    ],
)
async def test_invalid_series_requests_name_the_field(
    analytics: AnalyticsClient, params: dict, field: str
) -> None:
    body = assert_error(await analytics.get("timeseries", ADMIN, **params), 400, "INVALID_REQUEST")
    assert field in {d["field"] for d in body["details"]}


async def test_top_users_and_orgs_over_every_provider(analytics: AnalyticsClient) -> None:
    alice, bob, org_a, org_b = (uuid.uuid4() for _ in range(4))
    at = NOW - minutes(20)
    await analytics.store(
        usage_event(alice, 10, at),
        usage_event(alice, 30, at, provider="gemini", org_id=org_a),
        usage_event(bob, 100, at, org_id=org_b),
        usage_event(bob, 100, at, org_id=org_b, decision="RATE_LIMITED"),
        usage_event(bob, 999, NOW - minutes(61)),  # before the window
    )
    top = await analytics.ok("top", ADMIN, windowMinutes=60)
    assert top["provider"] is None
    assert [(u["userId"], u["totalTokens"]) for u in top["topUsers"]] == [
        (str(bob), 200),
        (str(alice), 40),
    ]
    assert top["topOrgs"] == [
        {"orgId": str(org_b), "totalTokens": 200, "events": 2, "allowedTokens": 100},
        {"orgId": str(org_a), "totalTokens": 30, "events": 1, "allowedTokens": 30},
    ]
    mine = await analytics.ok("top", bearer(alice), windowMinutes=60)
    assert [u["userId"] for u in mine["topUsers"]] == [str(alice)]
    assert [o["orgId"] for o in mine["topOrgs"]] == [str(org_a)]
    gemini = await analytics.ok("top", ADMIN, windowMinutes=60, provider="gemini")
    assert [u["userId"] for u in gemini["topUsers"]] == [str(alice)]


async def test_consumer_lag_is_for_admins(analytics: AnalyticsClient) -> None:
    assert_error(await analytics.get("admin/consumers", bearer(uuid.uuid4())), 403, "FORBIDDEN")
    body = await analytics.ok("admin/consumers", ADMIN)
    # HTTP push holds nothing in transit: a pushed batch is stored before it is answered.
    assert body == {
        "transports": ["http"],
        "lag": {"usage": 0, "purchase": 0},
        "total": 0,
        "measuredAt": "2026-03-01T12:00:00Z",
    }


async def test_the_new_reads_are_documented(analytics: AnalyticsClient) -> None:
    schema = (await analytics.http.get("/openapi.json")).json()
    for path in ("timeseries", "top", "admin/consumers"):
        operation = schema["paths"][f"/api/v1/analytics/{path}"]["get"]
        assert operation["description"], path
    series = schema["paths"]["/api/v1/analytics/timeseries"]["get"]
    assert {p["name"] for p in series["parameters"]} == {
        "windowMinutes",
        "bucketSeconds",
        "provider",
        "userId",
        "orgId",
    }
