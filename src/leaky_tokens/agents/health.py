"""A session's health from its latest events (the agent's reports and what the gateway saw),
with the thresholds of `settings.agents` (documented in README, "Agent API")."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from leaky_tokens.settings import AgentSettings

CALL_SOURCES = ("agent", "gateway")


def error_kind_of(event: dict[str, Any]) -> str:
    """An error's kind: the one given, else one from the status code."""
    if event.get("errorKind"):
        return str(event["errorKind"])
    status = event.get("statusCode")
    if status is None:
        return "unknown"
    if status == 429:
        return "rate_limited"
    if status in (401, 403):
        return "auth"
    if status == 402:
        return "budget"
    if status >= 500:
        return "provider" if status in (502, 503, 504) else "server"
    return "client"


def assess(events: Sequence[dict[str, Any]], settings: AgentSettings) -> dict[str, Any]:
    """Events newest first -> the health block of GET /v1/sessions/{id}/health."""
    calls = [e for e in events if e["source"] in CALL_SOURCES][: settings.health_window_events]
    total = len(calls)
    errors = [e for e in calls if e["outcome"] != "success"]
    by_kind = Counter(error_kind_of(e) for e in errors)
    by_source = {
        source: {
            "events": sum(1 for e in calls if e["source"] == source),
            "errors": sum(1 for e in errors if e["source"] == source),
        }
        for source in CALL_SOURCES
    }
    latencies = [e["latencyMs"] for e in calls if e.get("latencyMs") is not None]
    mean_latency = sum(latencies) / len(latencies) if latencies else None
    success_rate = (total - len(errors)) / total if total else None
    streak = 0
    for event in calls:
        if event["outcome"] == "success":
            break
        streak += 1
    status = "healthy"
    reasons: list[str] = []
    if total >= settings.health_min_events and success_rate is not None:
        if success_rate < settings.unhealthy_success_rate:
            status = "unhealthy"
            reasons.append(f"success rate {success_rate:.2f} < {settings.unhealthy_success_rate}")
        elif success_rate < settings.degraded_success_rate:
            status = "degraded"
            reasons.append(f"success rate {success_rate:.2f} < {settings.degraded_success_rate}")
    if streak >= settings.unhealthy_consecutive_errors:
        status = "unhealthy"
        reasons.append(f"{streak} errors in a row")
    slow = mean_latency is not None and mean_latency > settings.degraded_latency_ms
    if status == "healthy" and slow and total >= settings.health_min_events:
        status = "degraded"
        reasons.append(f"mean latency {mean_latency:.0f} ms > {settings.degraded_latency_ms}")
    last_error = None
    if errors:
        e = errors[0]
        last_error = {
            "source": e["source"],
            "status_code": e.get("statusCode"),
            "kind": error_kind_of(e),
            "message": e.get("message"),
            "at": e["createdAt"],
        }
    return {
        "status": status,
        "reasons": reasons,
        "events_considered": total,
        "success_rate": success_rate,
        "error_count": len(errors),
        "errors_by_kind": dict(by_kind),
        "by_source": by_source,
        "mean_latency_ms": mean_latency,
        "consecutive_errors": streak,
        "last_error": last_error,
        "thresholds": {
            "window_events": settings.health_window_events,
            "min_events": settings.health_min_events,
            "degraded_success_rate": settings.degraded_success_rate,
            "unhealthy_success_rate": settings.unhealthy_success_rate,
            "unhealthy_consecutive_errors": settings.unhealthy_consecutive_errors,
            "degraded_latency_ms": settings.degraded_latency_ms,
        },
    }
