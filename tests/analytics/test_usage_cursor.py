"""/usage pagination that stays fast on millions of rows (issue 10): an opaque keyset cursor
(`cursor` / `nextCursor`) and a bounded `total` (`totalExact: false` past 10 000), with the
plan's fields and `page=` paging unchanged."""

from __future__ import annotations

import uuid
from typing import Any

from bench.bulk import fill_usage_events
from tests.analytics.analytics_harness import (
    NOW,
    AnalyticsClient,
    assert_error,
    bearer,
    minutes,
    usage_event,
)

ADMIN = bearer(uuid.uuid4(), admin=True)


async def _walk(analytics: AnalyticsClient, caller: dict[str, str], **params: Any) -> list[Any]:
    pages = []
    body = await analytics.ok("usage", caller, provider="openai", **params)
    pages.append(body)
    while "nextCursor" in body:
        body = await analytics.ok(
            "usage", caller, provider="openai", cursor=body["nextCursor"], **params
        )
        pages.append(body)
    return pages


async def test_following_next_cursor_visits_every_event_once_newest_first(
    analytics: AnalyticsClient,
) -> None:
    user = uuid.uuid4()
    # many events share an instant: the cursor must break ties
    events = [usage_event(user, i, NOW - minutes(i // 25)) for i in range(230)]
    await analytics.store(*events)
    pages = await _walk(analytics, bearer(user), limit=40)
    assert [p["count"] for p in pages] == [40, 40, 40, 40, 40, 30]
    assert [p["pagination"]["page"] for p in pages] == [1, 2, 3, 4, 5, 6]
    assert all(p["pagination"]["total"] == 230 for p in pages)
    assert all("totalExact" not in p for p in pages)
    ids = [item["eventId"] for p in pages for item in p["items"]]
    assert sorted(ids) == sorted(str(e.event_id) for e in events)
    stamps = [item["key"]["timestamp"] for p in pages for item in p["items"]]
    assert stamps == sorted(stamps, reverse=True)


async def test_a_cursor_page_equals_the_offset_page_and_ignores_newer_events(
    analytics: AnalyticsClient,
) -> None:
    user = uuid.uuid4()
    await analytics.store(*(usage_event(user, i, NOW - minutes(10 + i)) for i in range(50)))
    first = await analytics.ok("usage", bearer(user), provider="openai", limit=20)
    by_offset = await analytics.ok("usage", bearer(user), provider="openai", limit=20, page=2)
    # newer events arrive between two pages: offset paging would repeat items, the cursor not
    await analytics.store(*(usage_event(user, 1, NOW - minutes(1)) for _ in range(5)))
    by_cursor = await analytics.ok(
        "usage", bearer(user), provider="openai", limit=20, cursor=first["nextCursor"]
    )
    assert by_cursor["items"] == by_offset["items"]
    assert by_cursor["pagination"]["page"] == 2


async def test_an_unknown_cursor_is_a_400(analytics: AnalyticsClient) -> None:
    for bad in ("nonsense", "eyJ0IjoxfQ", "e30"):
        response = await analytics.get("usage", ADMIN, provider="openai", cursor=bad)
        body = assert_error(response, 400, "INVALID_REQUEST")
        assert body["details"][0]["field"] == "cursor"


async def test_the_total_is_counted_up_to_a_bound(analytics: AnalyticsClient) -> None:
    # 31 000 generated events, a third of them openai: more than the bound of 10 000
    await fill_usage_events(analytics.service.db, 31_000, NOW - minutes(600), NOW)
    body = await analytics.ok("usage", ADMIN, provider="openai", limit=200)
    assert body["pagination"] == {
        "page": 1,
        "page_size": 200,
        "total": 10_000,
        "total_pages": 50,
    }
    assert body["totalExact"] is False
    assert body["count"] == 200
    # deep in, by cursor: still full pages, still newest first
    cursor = body["nextCursor"]
    for _ in range(30):
        body = await analytics.ok("usage", ADMIN, provider="openai", limit=200, cursor=cursor)
        cursor = body["nextCursor"]
    assert body["pagination"]["page"] == 31
    assert body["count"] == 200
    stamps = [i["key"]["timestamp"] for i in body["items"]]
    assert stamps == sorted(stamps, reverse=True)
    # a narrower scope under the bound is exact
    user = uuid.UUID(int=4096 + 3)
    mine = await analytics.ok("usage", bearer(user), provider="openai")
    assert "totalExact" not in mine
    # bench/bulk.py: user n % 1000, provider openai when n % 3 == 0
    assert mine["pagination"]["total"] == sum(
        1 for n in range(31_000) if n % 1000 == 3 and n % 3 == 0
    )


async def test_the_cursor_is_documented(analytics: AnalyticsClient) -> None:
    schema = (await analytics.http.get("/openapi.json")).json()
    operation = schema["paths"]["/api/v1/analytics/usage"]["get"]
    assert "cursor" in {p["name"] for p in operation["parameters"]}
    assert "nextCursor" in operation["description"]
    read = schema["components"]["schemas"]["UsageRead"]["properties"]
    assert {"nextCursor", "totalExact"} <= read.keys()
