"""Analytics by model (issue 12): events of the OpenAI-compatible API name a model and split
their tokens; usage items carry them, /report breaks down per model (events, prompt, completion
and total tokens, p50/p95 latency), anomalies and top can be asked per model, and events without
a model (/consume) keep the plan's shapes exactly."""

from __future__ import annotations

import uuid
from typing import Any

from tests.analytics.analytics_harness import (
    NOW,
    AnalyticsClient,
    bearer,
    minutes,
    usage_event,
)

ADMIN = bearer(uuid.uuid4(), admin=True)


def v1_event(
    user: uuid.UUID,
    model: str,
    prompt: int,
    completion: int,
    latency_ms: int,
    at_minutes_ago: float = 1,
    **extra: Any,
) -> Any:
    """A usage event as the token service writes it for a /v1 call (the usage-event contract)."""
    return usage_event(
        user,
        prompt + completion,
        NOW - minutes(at_minutes_ago),
        model=model,
        promptTokens=prompt,
        completionTokens=completion,
        estimated=False,
        latencyMs=latency_ms,
        stream=False,
        reservedTokens=prompt + 256,
        **extra,
    )


async def test_usage_items_carry_model_and_token_kinds_only_when_the_event_has_them(
    analytics: AnalyticsClient,
) -> None:
    user = uuid.uuid4()
    await analytics.store(
        v1_event(user, "gpt-4o-mini", 12, 30, 250, at_minutes_ago=1),
        usage_event(user, 20, NOW - minutes(2)),  # a /consume event
    )
    body = await analytics.ok("usage", bearer(user), provider="openai")
    v1, consume = body["items"]
    assert (v1["model"], v1["promptTokens"], v1["completionTokens"]) == ("gpt-4o-mini", 12, 30)
    assert (v1["tokens"], v1["latencyMs"]) == (42, 250)
    assert not consume.keys() & {"model", "promptTokens", "completionTokens", "latencyMs"}
    assert consume["tokens"] == 20


async def test_report_by_model_gives_events_token_kinds_and_latency_percentiles(
    analytics: AnalyticsClient,
) -> None:
    user = uuid.uuid4()
    latencies = [100 + 10 * i for i in range(20)]  # 100 .. 290 ms
    events = [v1_event(user, "gpt-4o-mini", 10, 5, ms) for ms in latencies]
    events += [v1_event(user, "gpt-4o", 100, 50, 900), v1_event(user, "gpt-4o", 200, 20, 700)]
    events += [usage_event(user, 7, NOW - minutes(3)) for _ in range(3)]
    events += [usage_event(user, 1000, NOW - minutes(4), decision="RATE_LIMITED", model="gpt-4o")]
    await analytics.store(*events)
    plain = await analytics.ok("report", ADMIN, provider="openai", windowMinutes=60)
    assert "byModel" not in plain  # the plan's shape unless asked
    report = await analytics.ok("report", ADMIN, provider="openai", byModel="true")
    assert report["totalEvents"] == 26
    by_model = {m["model"]: m for m in report["byModel"]}
    assert list(by_model) == ["gpt-4o", "gpt-4o-mini", None]  # most tokens first, None last
    mini = by_model["gpt-4o-mini"]
    assert (mini["totalEvents"], mini["allowedEvents"]) == (20, 20)
    assert (mini["promptTokens"], mini["completionTokens"], mini["totalTokens"]) == (200, 100, 300)
    # nearest rank: p50 is the 10th of 20 sorted, p95 the 19th
    assert (mini["p50LatencyMs"], mini["p95LatencyMs"]) == (190, 280)
    big = by_model["gpt-4o"]
    assert (big["totalEvents"], big["allowedEvents"]) == (3, 2)
    assert (big["totalTokens"], big["allowedTokens"]) == (1370, 370)
    assert (big["promptTokens"], big["completionTokens"]) == (300, 70)
    assert (big["p50LatencyMs"], big["p95LatencyMs"]) == (700, 900)
    consume = by_model[None]
    assert (consume["totalEvents"], consume["totalTokens"]) == (3, 21)
    assert (consume["promptTokens"], consume["completionTokens"]) == (0, 0)
    assert (consume["p50LatencyMs"], consume["p95LatencyMs"]) == (None, None)
    assert sum(m["totalTokens"] for m in report["byModel"]) == report["totalTokens"]


async def test_report_and_top_filtered_by_model(analytics: AnalyticsClient) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    await analytics.store(
        v1_event(a, "gemini-2.0-flash", 10, 10, 50, provider="gemini"),
        v1_event(b, "gemini-2.0-flash", 30, 30, 50, provider="gemini"),
        v1_event(a, "gemini-1.5-pro", 500, 500, 50, provider="gemini"),
    )
    report = await analytics.ok("report", ADMIN, provider="gemini", model="gemini-2.0-flash")
    assert report["model"] == "gemini-2.0-flash"
    assert (report["totalEvents"], report["totalTokens"], report["uniqueUsers"]) == (2, 80, 2)
    top = await analytics.ok("top", ADMIN, model="gemini-1.5-pro")
    assert [(u["userId"], u["totalTokens"]) for u in top["topUsers"]] == [(str(a), 1000)]
    mine = await analytics.ok("usage", bearer(a), provider="gemini", model="gemini-1.5-pro")
    assert [i["model"] for i in mine["items"]] == ["gemini-1.5-pro"]


async def test_anomalies_can_be_asked_per_model(analytics: AnalyticsClient) -> None:
    user = uuid.uuid4()
    events = []
    for hour in (1, 2, 3):  # a steady baseline of both models
        events.append(v1_event(user, "gpt-4o", 50, 50, 10, at_minutes_ago=60 * hour + 5))
        events.append(v1_event(user, "gpt-4o-mini", 50, 50, 10, at_minutes_ago=60 * hour + 5))
    events.append(v1_event(user, "gpt-4o-mini", 1000, 1000, 10, at_minutes_ago=5))  # mini spikes
    events.append(v1_event(user, "gpt-4o", 50, 50, 10, at_minutes_ago=5))
    await analytics.store(*events)
    mini = await analytics.ok("anomalies", ADMIN, provider="openai", model="gpt-4o-mini")
    assert (mini["model"], mini["currentTokens"], mini["anomaly"]) == ("gpt-4o-mini", 2000, True)
    assert mini["baselineWindowTokens"] == [100, 100, 100]
    steady = await analytics.ok("anomalies", ADMIN, provider="openai", model="gpt-4o")
    assert (steady["currentTokens"], steady["anomaly"]) == (100, False)
    overall = await analytics.ok("anomalies", ADMIN, provider="openai")
    assert "model" not in overall
    assert overall["currentTokens"] == 2100


async def test_the_timeseries_splits_by_the_model_column(analytics: AnalyticsClient) -> None:
    user = uuid.uuid4()
    await analytics.store(
        v1_event(user, "qwen-plus", 5, 5, 10, provider="qwen"),
        v1_event(user, "qwen-max", 7, 7, 10, provider="qwen"),
        usage_event(user, 3, NOW - minutes(1), provider="qwen"),
    )
    body = await analytics.ok("timeseries", bearer(user), provider="qwen")
    totals = {s["model"]: s["totals"]["tokens"] for s in body["series"]}
    assert totals == {None: 3, "qwen-max": 14, "qwen-plus": 10}


async def test_an_event_with_an_unreadable_model_is_rejected_not_stored(
    analytics: AnalyticsClient,
) -> None:
    user = uuid.uuid4()
    bad = v1_event(user, "x" * 129, 1, 1, 1)
    good = v1_event(user, "gpt-4o", 1, 1, 1)
    response = await analytics.ingest(bad, good)
    assert response.status_code == 200, response.text
    assert await analytics.service.usage_totals() == (1, 2)
