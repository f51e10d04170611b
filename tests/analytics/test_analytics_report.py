"""GET /api/v1/analytics/report (plan §6.2): exact totals over half-open windows."""

from __future__ import annotations

import random
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

REPORT_FIELDS = {
    # the plan's
    "provider",
    "windowStart",
    "windowEnd",
    "totalEvents",
    "allowedEvents",
    "deniedEvents",
    "totalTokens",
    "averageTokens",
    "uniqueUsers",
    "sampleLimit",
    "topUsers",
    # ours: the tokens quotas were charged
    "allowedTokens",
}
ADMIN = bearer(uuid.uuid4(), admin=True)


async def test_scenario_6_2_report_fields_and_totals(analytics: AnalyticsClient) -> None:
    heavy, light = uuid.uuid4(), uuid.uuid4()
    events = [usage_event(heavy, 20, NOW - minutes(10 + i)) for i in range(15)]
    events += [usage_event(light, 20, NOW - minutes(5 + i)) for i in range(8)]
    events += [usage_event(light, 20, NOW - minutes(3), decision="RATE_LIMITED") for _ in range(2)]
    await analytics.store(*events)
    report = await analytics.ok("report", ADMIN, provider="openai", windowMinutes=60)
    assert report.keys() == REPORT_FIELDS
    assert report["provider"] == "openai"
    assert report["windowStart"] == "2026-03-01T11:00:00Z"
    assert report["windowEnd"] == "2026-03-01T12:00:00Z"
    assert (report["totalEvents"], report["allowedEvents"], report["deniedEvents"]) == (25, 23, 2)
    # totalTokens: what every event asked for (plan: 500 over 25 events, average 20.0)
    assert (report["totalTokens"], report["allowedTokens"]) == (500, 460)
    assert report["averageTokens"] == 20.0
    assert report["uniqueUsers"] == 2
    assert report["sampleLimit"] == 200
    assert report["topUsers"][0] == {
        "userId": str(heavy),
        "totalTokens": 300,
        "events": 15,
        "allowedTokens": 300,
    }
    assert report["topUsers"][1] == {
        "userId": str(light),
        "totalTokens": 200,
        "events": 10,
        "allowedTokens": 160,
    }


async def test_events_at_the_window_edges_land_in_the_right_window(
    analytics: AnalyticsClient,
) -> None:
    user = uuid.uuid4()
    start = NOW - minutes(30)
    tick = timedelta(microseconds=1)
    await analytics.store(
        usage_event(user, 1, start - tick),  # just before: out
        usage_event(user, 10, start),  # at the start: in
        usage_event(user, 100, NOW - tick),  # just before the end: in
        usage_event(user, 1000, NOW),  # at the end: the next window's
    )
    report = await analytics.ok("report", bearer(user), provider="openai", windowMinutes=30)
    assert (report["totalEvents"], report["totalTokens"]) == (2, 110)
    analytics.clock.advance(30 * 60)  # the next window: only the event at its start
    later = await analytics.ok("report", bearer(user), provider="openai", windowMinutes=30)
    assert (later["totalEvents"], later["totalTokens"]) == (1, 1000)


async def test_report_totals_equal_the_sum_of_the_stored_events(
    analytics: AnalyticsClient,
) -> None:
    rng = random.Random(11)
    users = [uuid.uuid4() for _ in range(8)]
    decisions = ["ALLOWED"] * 6 + ["RATE_LIMITED", "QUOTA_INSUFFICIENT", "PROVIDER_FAILURE"]
    events = [
        usage_event(
            rng.choice(users),
            rng.randint(1, 500),
            NOW - timedelta(seconds=rng.randint(1, 3 * 3600)),
            decision=rng.choice(decisions),
            provider=rng.choice(["openai", "openai", "qwen"]),
        )
        for _ in range(400)
    ]
    await analytics.store(*events)
    for window in (1, 17, 60, 180):
        start = NOW - minutes(window)
        inside = [
            e for e in events if e.payload["provider"] == "openai" and start <= e.occurred_at < NOW
        ]
        report = await analytics.ok("report", ADMIN, provider="openai", windowMinutes=window)
        assert report["totalEvents"] == len(inside)
        assert report["allowedEvents"] == sum(e.payload["allowed"] for e in inside)
        assert report["totalTokens"] == sum(e.payload["tokens"] for e in inside)
        assert report["allowedTokens"] == sum(
            e.payload["tokens"] for e in inside if e.payload["allowed"]
        )
        assert report["uniqueUsers"] == len({e.payload["userId"] for e in inside})
        per_user: dict[str, int] = {}
        for e in inside:
            per_user[e.payload["userId"]] = (
                per_user.get(e.payload["userId"], 0) + e.payload["tokens"]
            )
        top = sorted(per_user.values(), reverse=True)[:5]
        assert [u["totalTokens"] for u in report["topUsers"]] == top


async def test_top_users_are_the_five_biggest(analytics: AnalyticsClient) -> None:
    users = [uuid.uuid4() for _ in range(7)]
    await analytics.store(
        *(usage_event(u, 10 * (i + 1), NOW - minutes(1)) for i, u in enumerate(users))
    )
    report = await analytics.ok("report", ADMIN, provider="openai")
    assert [u["userId"] for u in report["topUsers"]] == [str(u) for u in users[::-1][:5]]


async def test_an_empty_window_reports_zeros(analytics: AnalyticsClient) -> None:
    report = await analytics.ok("report", bearer(uuid.uuid4()), provider="gemini")
    assert report["totalEvents"] == report["totalTokens"] == report["uniqueUsers"] == 0
    assert report["averageTokens"] == 0.0
    assert report["topUsers"] == []


async def test_a_user_report_covers_only_their_events(analytics: AnalyticsClient) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    await analytics.store(
        usage_event(alice, 20, NOW - minutes(1)), usage_event(bob, 500, NOW - minutes(1))
    )
    report = await analytics.ok("report", bearer(alice), provider="openai")
    assert (report["totalTokens"], report["uniqueUsers"]) == (20, 1)
    assert [u["userId"] for u in report["topUsers"]] == [str(alice)]


@pytest.mark.parametrize("value", [0, -5, 1441, "sixty", 2.5])
async def test_window_minutes_out_of_range_is_a_400(
    analytics: AnalyticsClient, value: object
) -> None:
    response = await analytics.get("report", ADMIN, provider="openai", windowMinutes=value)
    body = assert_error(response, 400, "INVALID_REQUEST")
    assert [d["field"] for d in body["details"]] == ["windowMinutes"]


async def test_the_longest_window_is_a_day(analytics: AnalyticsClient) -> None:
    user = uuid.uuid4()
    await analytics.store(usage_event(user, 7, NOW - minutes(1439)))
    report = await analytics.ok("report", bearer(user), provider="openai", windowMinutes=1440)
    assert report["totalTokens"] == 7
    assert report["windowStart"] == "2026-02-28T12:00:00Z"
