"""The documented thresholds of a session's health (agents/health.py)."""

from __future__ import annotations

from typing import Any

from leaky_tokens.agents.health import assess, error_kind_of
from leaky_tokens.settings import AgentSettings

SETTINGS = AgentSettings()


def _event(outcome: str, status: int | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "source": extra.pop("source", "agent"),
        "outcome": outcome,
        "statusCode": status,
        "latencyMs": extra.pop("latency", 100),
        "errorKind": extra.pop("kind", None),
        "message": None,
        "createdAt": "2026-12-04T18:00:00+00:00",
    }


def _newest_first(*events: dict[str, Any]) -> list[dict[str, Any]]:
    return list(events)


def test_no_events_is_healthy_with_nothing_to_rate() -> None:
    health = assess([], SETTINGS)
    assert health["status"] == "healthy"
    assert health["success_rate"] is None
    assert health["last_error"] is None


def test_fewer_events_than_the_minimum_are_not_rated_by_success_rate() -> None:
    health = assess(_newest_first(_event("http_error", 500), _event("success", 200)), SETTINGS)
    assert health["status"] == "healthy"
    assert health["success_rate"] == 0.5


def test_below_the_degraded_rate_is_degraded_and_below_the_unhealthy_rate_unhealthy() -> None:
    degraded = [_event("success", 200)] * 8 + [_event("http_error", 503)] * 2  # 0.8
    assert assess(degraded, SETTINGS)["status"] == "degraded"
    unhealthy = [_event("success", 200)] * 4 + [_event("http_error", 503)] * 6  # 0.4
    assert assess(unhealthy, SETTINGS)["status"] == "unhealthy"
    healthy = [_event("success", 200)] * 19 + [_event("http_error", 503)]  # 0.95
    assert assess(healthy, SETTINGS)["status"] == "healthy"


def test_consecutive_errors_make_a_session_unhealthy_whatever_its_rate() -> None:
    latest = [_event("http_error", 429)] * SETTINGS.unhealthy_consecutive_errors
    health = assess(latest + [_event("success", 200)] * 100, SETTINGS)
    assert health["status"] == "unhealthy"
    assert health["consecutive_errors"] == SETTINGS.unhealthy_consecutive_errors
    assert health["errors_by_kind"] == {"rate_limited": SETTINGS.unhealthy_consecutive_errors}


def test_a_slow_but_successful_session_is_degraded() -> None:
    slow = [_event("success", 200, latency=SETTINGS.degraded_latency_ms + 1)] * 5
    health = assess(slow, SETTINGS)
    assert health["status"] == "degraded"
    assert health["reasons"]


def test_only_the_latest_window_counts_and_rotations_are_not_calls() -> None:
    settings = AgentSettings(health_window_events=5)
    events = [_event("success", 200)] * 5 + [_event("http_error", 500)] * 50
    events.insert(0, {**_event("rotated"), "source": "rotation"})
    health = assess(events, settings)
    assert health["events_considered"] == 5
    assert health["status"] == "healthy"


def test_both_sources_count_and_are_told_apart() -> None:
    events = [
        _event("http_error", 502, source="gateway"),
        _event("success", 200, source="agent"),
        _event("success", 200, source="gateway"),
    ]
    health = assess(events, SETTINGS)
    assert health["by_source"] == {
        "agent": {"events": 1, "errors": 0},
        "gateway": {"events": 2, "errors": 1},
    }
    assert health["last_error"]["source"] == "gateway"
    assert health["last_error"]["kind"] == "provider"


def test_error_kinds_come_from_the_reported_kind_else_the_status() -> None:
    assert error_kind_of(_event("http_error", 500, kind="timeout")) == "timeout"
    assert error_kind_of(_event("http_error", 429)) == "rate_limited"
    assert error_kind_of(_event("http_error", 401)) == "auth"
    assert error_kind_of(_event("http_error", 402)) == "budget"
    assert error_kind_of(_event("http_error", 504)) == "provider"
    assert error_kind_of(_event("http_error", 500)) == "server"
    assert error_kind_of(_event("http_error", 404)) == "client"
    assert error_kind_of(_event("http_error")) == "unknown"
