"""Ingestion: each event id stored once, usage and purchase events kept apart, the internal
token required (every test on SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import random
import uuid

from tests.analytics.analytics_harness import (
    NOW,
    AnalyticsClient,
    assert_error,
    bearer,
    minutes,
    purchase_event,
    usage_event,
)


async def test_stores_a_redelivered_event_once(analytics: AnalyticsClient) -> None:
    user = uuid.uuid4()
    first = usage_event(user, 20, NOW - minutes(1))
    second = usage_event(user, 30, NOW - minutes(2))
    await analytics.store(first, second)
    await analytics.store(first)  # a redelivery, alone
    await analytics.store(second, first, usage_event(user, 5, NOW - minutes(3)))  # and mixed in
    body = await analytics.ok("usage", bearer(user), provider="openai")
    assert body["count"] == 3
    assert sorted(item["tokens"] for item in body["items"]) == [5, 20, 30]
    assert await analytics.service.usage_totals() == (3, 55)


async def test_concurrent_redeliveries_store_each_event_once(analytics: AnalyticsClient) -> None:
    user = uuid.uuid4()
    events = [usage_event(user, i + 1, NOW - minutes(1)) for i in range(60)]
    rng = random.Random(5)
    batches = [rng.sample(events, 25) for _ in range(30)] + [events]
    responses = await asyncio.gather(*(analytics.ingest(*batch) for batch in batches))
    assert {r.status_code for r in responses} == {200}
    assert await analytics.service.usage_totals() == (60, sum(range(1, 61)))


async def test_purchase_events_never_count_as_usage(analytics: AnalyticsClient) -> None:
    user = uuid.uuid4()
    await analytics.store(
        usage_event(user, 20, NOW - minutes(1)),
        purchase_event(user, 1000, NOW - minutes(1), "PurchaseStarted"),
        purchase_event(user, 1000, NOW - minutes(1), "TokensAllocated"),
    )
    usage = await analytics.ok("usage", bearer(user), provider="openai")
    assert [item["tokens"] for item in usage["items"]] == [20]
    report = await analytics.ok("report", bearer(user), provider="openai")
    assert (report["totalEvents"], report["totalTokens"]) == (1, 20)
    purchases = await analytics.ok("purchases", bearer(user))
    assert sorted(item["type"] for item in purchases["items"]) == [
        "PurchaseStarted",
        "TokensAllocated",
    ]
    assert purchases["pagination"]["total"] == 2
    assert await analytics.service.usage_totals() == (1, 20)


async def test_a_user_sees_only_their_own_purchase_events(analytics: AnalyticsClient) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    await analytics.store(
        purchase_event(alice, 10, NOW, "PurchaseCompleted"),
        purchase_event(bob, 10, NOW, "PurchaseFailed"),
    )
    mine = await analytics.ok("purchases", bearer(alice))
    assert [item["type"] for item in mine["items"]] == ["PurchaseCompleted"]
    assert_error(await analytics.get("purchases", bearer(alice), userId=str(bob)), 403, "FORBIDDEN")
    everyone = await analytics.ok("purchases", bearer(uuid.uuid4(), admin=True))
    assert everyone["pagination"]["total"] == 2


async def test_ingestion_needs_the_internal_token(analytics: AnalyticsClient) -> None:
    event = usage_event(uuid.uuid4(), 20, NOW)
    wrong = await analytics.ingest(event, token="not-the-token")
    assert_error(wrong, 401, "AUTH_INVALID_INTERNAL_TOKEN")
    missing = await analytics.http.post(
        "/api/v1/analytics/events", json={"events": [event.to_wire()]}
    )
    assert_error(missing, 401, "AUTH_INVALID_INTERNAL_TOKEN")
    # A user's own credentials are no substitute for the internal token.
    as_user = await analytics.http.post(
        "/api/v1/analytics/events",
        json={"events": [event.to_wire()]},
        headers=bearer(uuid.uuid4(), admin=True),
    )
    assert_error(as_user, 401, "AUTH_INVALID_INTERNAL_TOKEN")
    assert await analytics.service.usage_totals() == (0, 0)


async def test_a_malformed_batch_is_a_400(analytics: AnalyticsClient) -> None:
    headers = {"X-Internal-Token": "test-internal-token"}
    for body in (b"{not json", b"[]", b'{"events": "many"}', b"{}"):
        response = await analytics.http.post(
            "/api/v1/analytics/events", content=body, headers=headers
        )
        assert_error(response, 400, "INVALID_REQUEST")


async def test_an_unreadable_event_is_dropped_and_the_rest_stored(
    analytics: AnalyticsClient,
) -> None:
    # Refusing the batch would make the relay send it again forever.
    good = usage_event(uuid.uuid4(), 20, NOW)
    response = await analytics.http.post(
        "/api/v1/analytics/events",
        json={"events": [{"eventId": "nope"}, good.to_wire()]},
        headers={"X-Internal-Token": "test-internal-token"},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"received": 1, "rejected": 1}
    assert await analytics.service.usage_totals() == (1, 20)


async def test_an_unreadable_usage_payload_is_dropped_and_the_rest_stored(
    analytics: AnalyticsClient,
) -> None:
    user = uuid.uuid4()
    good = usage_event(user, 20, NOW)
    bad = usage_event(user, 20, NOW).model_copy(update={"payload": {"decision": "ALLOWED"}})
    await analytics.store(good, bad)
    assert await analytics.service.usage_totals() == (1, 20)


async def test_events_of_other_streams_are_ignored(analytics: AnalyticsClient) -> None:
    other = usage_event(uuid.uuid4(), 20, NOW).model_copy(update={"stream": "billing"})
    await analytics.store(other)
    assert await analytics.service.usage_totals() == (0, 0)


async def test_metrics_count_received_and_stored_events(analytics: AnalyticsClient) -> None:
    event = usage_event(uuid.uuid4(), 20, NOW)
    await analytics.store(event)
    await analytics.store(event)
    text = (await analytics.http.get("/metrics")).text
    assert 'analytics_events_received_total{stream="usage"} 2.0' in text
    assert 'analytics_events_stored_total{stream="usage"} 1.0' in text
    assert "analytics_event_delay_seconds_count 2.0" in text
