"""Spike detection: the tokens of the current window against the average of the windows before.

    ratio   = currentTokens / max(baselineAverage, 1)
    anomaly = currentTokens > 0 and ratio >= threshold

The baseline is floored at one token per window so the ratio is always finite (JSON has no
Infinity): with no usage before, the ratio is the current window's token count, so new usage of
at least `threshold` tokens counts as a spike, and no usage at all is never one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

BASELINE_FLOOR = 1.0


@dataclass(frozen=True, slots=True)
class Windows:
    """The current window [current_start, end) and the baseline windows before it, oldest first."""

    current_start: datetime
    end: datetime
    baseline: list[tuple[datetime, datetime]]


def windows_ending_at(end: datetime, width: timedelta, baseline_windows: int) -> Windows:
    current_start = end - width
    baseline = [
        (current_start - width * k, current_start - width * (k - 1))
        for k in range(baseline_windows, 0, -1)
    ]
    return Windows(current_start, end, baseline)


@dataclass(frozen=True, slots=True)
class Verdict:
    current_tokens: int
    baseline_average: float
    ratio: float
    anomaly: bool


def judge(current_tokens: int, baseline_tokens: list[int], threshold: float) -> Verdict:
    average = sum(baseline_tokens) / len(baseline_tokens) if baseline_tokens else 0.0
    ratio = current_tokens / max(average, BASELINE_FLOOR)
    return Verdict(
        current_tokens=current_tokens,
        baseline_average=average,
        ratio=ratio,
        anomaly=current_tokens > 0 and ratio >= threshold,
    )
