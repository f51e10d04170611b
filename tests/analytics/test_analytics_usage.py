"""GET /api/v1/analytics/usage (plan §6.1): newest first, limit and paging, who sees what."""

from __future__ import annotations

import uuid
from datetime import datetime

import pytest

from tests.analytics.analytics_harness import (
    NOW,
    AnalyticsClient,
    assert_error,
    bearer,
    minutes,
    usage_event,
)

ITEM_FIELDS = {"key", "userId", "tokens", "allowed", "decision", "eventId", "orgId", "requestId"}


async def test_scenario_6_1_items_have_the_plans_shape_newest_first(
    analytics: AnalyticsClient,
) -> None:
    user = uuid.uuid4()
    events = [usage_event(user, 20, NOW - minutes(5 - i)) for i in range(5)]
    await analytics.store(*events)
    body = await analytics.ok("usage", bearer(user), provider="openai", limit=10)
    assert body.keys() == {"provider", "count", "items", "pagination"}
    assert body["provider"] == "openai"
    assert body["count"] == 5
    first = body["items"][0]
    assert first.keys() == ITEM_FIELDS
    assert first["key"] == {"provider": "openai", "timestamp": "2026-03-01T11:59:00Z"}
    assert first["userId"] == str(user)
    assert (first["tokens"], first["allowed"], first["decision"]) == (20, True, "ALLOWED")
    assert first["requestId"] == events[-1].payload["requestId"]
    stamps = [datetime.fromisoformat(item["key"]["timestamp"]) for item in body["items"]]
    assert stamps == sorted(stamps, reverse=True)
    assert [item["eventId"] for item in body["items"]] == [str(e.event_id) for e in events[::-1]]


async def test_events_with_the_same_timestamp_are_all_kept(analytics: AnalyticsClient) -> None:
    # The Java original keyed rows by (provider, timestamp) and lost all but one of these.
    user = uuid.uuid4()
    await analytics.store(*(usage_event(user, 10 + i, NOW - minutes(1)) for i in range(7)))
    body = await analytics.ok("usage", bearer(user), provider="openai")
    assert body["count"] == 7
    assert sorted(item["tokens"] for item in body["items"]) == list(range(10, 17))


async def test_limit_defaults_to_20_and_is_at_most_200(analytics: AnalyticsClient) -> None:
    user = uuid.uuid4()
    await analytics.store(*(usage_event(user, 1, NOW - minutes(i % 50)) for i in range(210)))
    default = await analytics.ok("usage", bearer(user), provider="openai")
    assert default["count"] == 20
    assert default["pagination"] == {"page": 1, "page_size": 20, "total": 210, "total_pages": 11}
    most = await analytics.ok("usage", bearer(user), provider="openai", limit=200)
    assert most["count"] == 200
    for bad in (201, 0, -1, "ten", 1.5):
        response = await analytics.get("usage", bearer(user), provider="openai", limit=bad)
        body = assert_error(response, 400, "INVALID_REQUEST")
        assert {d["field"] for d in body["details"]} == {"limit"}


async def test_pages_cover_every_event_once(analytics: AnalyticsClient) -> None:
    user = uuid.uuid4()
    events = [usage_event(user, i, NOW - minutes(1)) for i in range(1, 46)]
    await analytics.store(*events)
    seen: list[str] = []
    for page in (1, 2, 3):
        body = await analytics.ok("usage", bearer(user), provider="openai", limit=20, page=page)
        assert body["pagination"]["total_pages"] == 3
        seen.extend(item["eventId"] for item in body["items"])
    assert len(seen) == len(set(seen)) == 45
    empty = await analytics.ok("usage", bearer(user), provider="openai", limit=20, page=4)
    assert (empty["count"], empty["items"]) == (0, [])
    assert_error(
        await analytics.get("usage", bearer(user), provider="openai", page=0),
        400,
        "INVALID_REQUEST",
    )


async def test_a_user_sees_only_their_own_events(analytics: AnalyticsClient) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    await analytics.store(usage_event(alice, 20, NOW), usage_event(bob, 30, NOW))
    mine = await analytics.ok("usage", bearer(alice), provider="openai")
    assert [item["userId"] for item in mine["items"]] == [str(alice)]
    own_filter = await analytics.ok("usage", bearer(alice), provider="openai", userId=str(alice))
    assert own_filter["count"] == 1
    for path in ("usage", "report", "anomalies"):
        response = await analytics.get(path, bearer(alice), provider="openai", userId=str(bob))
        assert_error(response, 403, "FORBIDDEN")


async def test_an_admin_sees_everyone_and_may_filter_by_user_or_org(
    analytics: AnalyticsClient,
) -> None:
    alice, bob, org = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await analytics.store(
        usage_event(alice, 20, NOW - minutes(1)),
        usage_event(bob, 30, NOW - minutes(1)),
        usage_event(bob, 40, NOW - minutes(1), org_id=org),
    )
    admin = bearer(uuid.uuid4(), admin=True)
    everyone = await analytics.ok("usage", admin, provider="openai")
    assert everyone["count"] == 3
    only_bob = await analytics.ok("usage", admin, provider="openai", userId=str(bob))
    assert sorted(i["tokens"] for i in only_bob["items"]) == [30, 40]
    only_org = await analytics.ok("usage", admin, provider="openai", orgId=str(org))
    assert [(i["tokens"], i["orgId"]) for i in only_org["items"]] == [(40, str(org))]
    report = await analytics.ok("report", admin, provider="openai", orgId=str(org))
    assert (report["totalEvents"], report["totalTokens"]) == (1, 40)


async def test_other_providers_are_not_mixed_in(analytics: AnalyticsClient) -> None:
    user = uuid.uuid4()
    await analytics.store(
        usage_event(user, 20, NOW, provider="openai"), usage_event(user, 30, NOW, provider="qwen")
    )
    qwen = await analytics.ok("usage", bearer(user), provider="QWEN")
    assert [(i["key"]["provider"], i["tokens"]) for i in qwen["items"]] == [("qwen", 30)]


@pytest.mark.parametrize("path", ["usage", "report", "anomalies"])
async def test_unknown_or_missing_provider_is_a_400(analytics: AnalyticsClient, path: str) -> None:
    user = bearer(uuid.uuid4())
    unknown = assert_error(
        await analytics.get(path, user, provider="claude"), 400, "INVALID_REQUEST"
    )
    assert [d["field"] for d in unknown["details"]] == ["provider"]
    missing = assert_error(await analytics.get(path, user), 400, "INVALID_REQUEST")
    assert [d["field"] for d in missing["details"]] == ["provider"]
    bad_user = await analytics.get(path, user, provider="openai", userId="not-a-uuid")
    assert [d["field"] for d in assert_error(bad_user, 400, "INVALID_REQUEST")["details"]] == [
        "userId"
    ]


@pytest.mark.parametrize("path", ["usage", "report", "anomalies", "purchases"])
async def test_every_query_needs_credentials(analytics: AnalyticsClient, path: str) -> None:
    response = await analytics.http.get(f"/api/v1/analytics/{path}", params={"provider": "openai"})
    assert_error(response, 401, "AUTH_INVALID_KEY")
