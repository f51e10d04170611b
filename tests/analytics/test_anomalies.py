"""GET /api/v1/analytics/anomalies (plan §6.3): the detection rule, its windows, its bounds."""

from __future__ import annotations

import json
import math
import uuid
from datetime import timedelta

import pytest

from leaky_tokens.analytics.anomalies import judge, windows_ending_at
from tests.analytics.analytics_harness import (
    NOW,
    AnalyticsClient,
    assert_error,
    bearer,
    minutes,
    usage_event,
)

ANOMALY_FIELDS = {
    # the plan's
    "provider",
    "currentWindowStart",
    "currentWindowEnd",
    "baselineWindows",
    "currentTokens",
    "baselineAverage",
    "ratio",
    "threshold",
    "anomaly",
    "sampleLimit",
    # ours
    "windowMinutes",
    "baselineWindowTokens",
}


def test_the_plans_example_is_an_anomaly() -> None:
    verdict = judge(5000, [150, 150, 150], 2.0)
    assert verdict.baseline_average == 150.0
    assert round(verdict.ratio, 2) == 33.33
    assert verdict.anomaly


def test_usage_at_the_baseline_level_is_not_an_anomaly() -> None:
    assert not judge(150, [100, 200, 150], 2.0).anomaly
    assert judge(300, [100, 200, 150], 2.0).anomaly  # exactly threshold x baseline counts


def test_a_zero_baseline_gives_a_finite_ratio() -> None:
    nothing = judge(0, [0, 0, 0], 2.0)
    assert (nothing.ratio, nothing.anomaly) == (0.0, False)
    new_usage = judge(5000, [0, 0, 0], 2.0)
    assert math.isfinite(new_usage.ratio)
    assert (new_usage.ratio, new_usage.anomaly) == (5000.0, True)
    # below one token per window the floor holds: still finite, still the current count
    assert judge(1, [1, 0, 0], 2.0).ratio == 1.0


def test_baseline_windows_adjoin_the_current_one_oldest_first() -> None:
    windows = windows_ending_at(NOW, timedelta(minutes=10), 3)
    assert windows.current_start == NOW - minutes(10)
    assert windows.baseline == [
        (NOW - minutes(40), NOW - minutes(30)),
        (NOW - minutes(30), NOW - minutes(20)),
        (NOW - minutes(20), NOW - minutes(10)),
    ]


async def test_scenario_6_3_a_spike_over_the_baseline_is_an_anomaly(
    analytics: AnalyticsClient,
) -> None:
    user = uuid.uuid4()
    # baseline: 150 tokens in each of the three 10-minute windows before the current one
    baseline = [
        usage_event(user, 50, NOW - minutes(10 * k + 5) + timedelta(seconds=s))
        for k in (1, 2, 3)
        for s in (0, 60, 120)
    ]
    await analytics.store(*baseline)
    calm = await analytics.ok("anomalies", bearer(user), provider="openai", windowMinutes=10)
    assert calm.keys() == ANOMALY_FIELDS
    assert (calm["currentTokens"], calm["baselineAverage"], calm["anomaly"]) == (0, 150.0, False)
    assert calm["baselineWindowTokens"] == [150, 150, 150]

    await analytics.store(*(usage_event(user, 50, NOW - minutes(2)) for _ in range(100)))
    spike = await analytics.ok("anomalies", bearer(user), provider="openai", windowMinutes=10)
    assert spike["currentWindowStart"] == "2026-03-01T11:50:00Z"
    assert spike["currentWindowEnd"] == "2026-03-01T12:00:00Z"
    assert spike["baselineWindows"] == 3
    assert spike["currentTokens"] == 5000
    assert spike["baselineAverage"] == 150.0
    assert spike["ratio"] == 33.33
    assert spike["threshold"] == 2.0
    assert spike["anomaly"] is True
    assert spike["sampleLimit"] == 200


async def test_denied_requests_count_towards_a_spike(analytics: AnalyticsClient) -> None:
    # A burst the bucket refuses is still a burst of demand.
    user = uuid.uuid4()
    await analytics.store(usage_event(user, 50, NOW - minutes(15)))
    await analytics.store(
        *(usage_event(user, 50, NOW - minutes(1), decision="RATE_LIMITED") for _ in range(10))
    )
    body = await analytics.ok("anomalies", bearer(user), provider="openai", windowMinutes=10)
    assert (body["currentTokens"], body["anomaly"]) == (500, True)


async def test_an_event_on_a_window_boundary_belongs_to_the_later_window(
    analytics: AnalyticsClient,
) -> None:
    user = uuid.uuid4()
    await analytics.store(
        usage_event(user, 7, NOW - minutes(10)),  # start of the current window
        usage_event(user, 3, NOW - minutes(20)),  # start of the newest baseline window
        usage_event(user, 1, NOW - minutes(40)),  # start of the oldest baseline window
        usage_event(user, 1000, NOW - minutes(40) - timedelta(microseconds=1)),  # before all
    )
    body = await analytics.ok(
        "anomalies", bearer(user), provider="openai", windowMinutes=10, baselineWindows=3
    )
    assert body["currentTokens"] == 7
    assert body["baselineWindowTokens"] == [1, 0, 3]


async def test_a_new_user_has_no_baseline_and_a_finite_ratio(analytics: AnalyticsClient) -> None:
    user = uuid.uuid4()
    quiet = await analytics.get("anomalies", bearer(user), provider="openai")
    assert json.loads(quiet.text, parse_constant=_no_constants)["ratio"] == 0.0
    await analytics.store(usage_event(user, 40, NOW - minutes(1)))
    body = json.loads(
        (await analytics.get("anomalies", bearer(user), provider="openai")).text,
        parse_constant=_no_constants,
    )
    assert (body["baselineAverage"], body["ratio"], body["anomaly"]) == (0.0, 40.0, True)


async def test_threshold_and_baseline_windows_are_honoured(analytics: AnalyticsClient) -> None:
    user = uuid.uuid4()
    await analytics.store(
        usage_event(user, 100, NOW - minutes(90)),  # oldest of 2 windows of 60
        usage_event(user, 300, NOW - minutes(30)),
    )
    two = await analytics.ok("anomalies", bearer(user), provider="openai", baselineWindows=2)
    assert (two["baselineAverage"], two["ratio"]) == (50.0, 6.0)
    assert two["anomaly"] is True
    strict = await analytics.ok(
        "anomalies", bearer(user), provider="openai", baselineWindows=2, threshold=6.5
    )
    assert (strict["threshold"], strict["anomaly"]) == (6.5, False)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("baselineWindows", 0),
        ("baselineWindows", 25),
        ("baselineWindows", "three"),
        ("threshold", 0.99),
        ("threshold", -2),
        ("threshold", "inf"),
        ("threshold", "nan"),
        ("threshold", "high"),
        ("windowMinutes", 0),
        ("windowMinutes", 1441),
    ],
)
async def test_bad_numbers_are_a_400(analytics: AnalyticsClient, name: str, value: object) -> None:
    response = await analytics.get(
        "anomalies", bearer(uuid.uuid4()), provider="openai", **{name: value}
    )
    body = assert_error(response, 400, "INVALID_REQUEST")
    assert [d["field"] for d in body["details"]] == [name]


def _no_constants(name: str) -> float:
    raise AssertionError(f"{name} in JSON")
