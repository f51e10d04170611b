"""Run-time fault injection for a provider stub: errors, hangs, latency and broken streams.

One fault set per stub process, replaced whole through `PUT /api/v1/{provider}/faults` (which
needs the internal token). Each inference call takes one `Decision` from the injector; the
emulated API renders it in its provider's own wire format (an OpenAI 429 with `retry-after-ms`,
DashScope's `Throttling.RateQuota`, Gemini's `RESOURCE_EXHAUSTED` with `RetryInfo`, ...).
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, replace
from typing import Literal

from leaky_tokens.shared.errors import AppError, ServiceUnavailable, TooManyRequests

log = logging.getLogger(__name__)

MAX_LATENCY_MS = 60_000
MAX_RETRY_AFTER_MS = 3_600_000

ErrorKind = Literal["rate_limited", "down", "failure"]


@dataclass(frozen=True, slots=True)
class Faults:
    """What the stub does wrong; the default does nothing wrong."""

    failure_rate: float = 0.0  # probability in [0, 1] that a call fails with a 500
    latency_ms: int = 0  # added before every answer, success or failure
    down: bool = False  # every call answers 503
    rate_limited: bool = False  # every call answers 429 with the provider's retry hint
    retry_after_ms: int = 1000  # the hint a 429 (and a 503) carries
    hang: bool = False  # calls are accepted and never answered (until the client gives up)
    chunk_delay_ms: int | None = None  # pause before each streamed chunk; None: the setting
    cut_stream_after: int | None = None  # streams: close the socket after N chunks, no end
    error_event_after: int | None = None  # streams: the provider's error event after N chunks
    error_as_array: bool = False  # Gemini: error bodies wrapped in a JSON array (Vertex style)
    remaining_calls: int | None = None  # the faults apply to the next N calls only; None: all

    @property
    def retry_after_seconds(self) -> int:
        """The retry hint in whole seconds, at least 1 (for Retry-After)."""
        return max(1, -(-self.retry_after_ms // 1000))


NO_FAULTS = Faults()


@dataclass(frozen=True, slots=True)
class Decision:
    """What one call suffers, drawn once when it arrives."""

    faults: Faults
    error: ErrorKind | None

    @property
    def latency_seconds(self) -> float:
        return self.faults.latency_ms / 1000

    def chunk_delay_seconds(self, default_ms: int) -> float:
        delay = self.faults.chunk_delay_ms
        return (default_ms if delay is None else delay) / 1000


class ProviderDown(ServiceUnavailable):
    default_message = "provider is down"


class SimulatedProviderFailure(AppError):
    status = 500
    code = "PROVIDER_ERROR"
    default_message = "simulated provider failure"


class SimulatedRateLimit(TooManyRequests):
    default_message = "provider rate limit (simulated)"


class FaultInjector:
    """Holds one stub's current faults (per process) and deals them out to calls.

    Faults are replaced whole, never mutated, so a call sees one consistent set even if they
    change while it sleeps. The random source is injected so tests are deterministic.
    """

    def __init__(self, rng: random.Random, *, provider: str) -> None:
        self._rng = rng
        self._provider = provider
        self._faults = NO_FAULTS

    @property
    def faults(self) -> Faults:
        return self._faults

    def set_faults(self, faults: Faults) -> Faults:
        if not 0.0 <= faults.failure_rate <= 1.0:
            raise ValueError("failure_rate must be within [0, 1]")
        if not 0 <= faults.latency_ms <= MAX_LATENCY_MS:
            raise ValueError(f"latency_ms must be within [0, {MAX_LATENCY_MS}]")
        self._faults = faults
        log.info(
            "provider faults set", extra={"provider": self._provider, "faults": asdict(faults)}
        )
        return faults

    def clear_faults(self) -> None:
        self.set_faults(NO_FAULTS)

    def decide(self) -> Decision:
        """This call's share of the faults (counting it against `remaining_calls`)."""
        faults = self._faults
        if faults.remaining_calls is not None:
            left = faults.remaining_calls - 1
            # Synchronous: no other call can take the same count between read and write.
            self._faults = NO_FAULTS if left <= 0 else replace(faults, remaining_calls=left)
        error: ErrorKind | None = None
        if faults.down:
            error = "down"
        elif faults.rate_limited:
            error = "rate_limited"
        # Draw only when failures are possible, so a rate of 0 leaves the random sequence alone.
        elif faults.failure_rate > 0.0 and self._rng.random() < faults.failure_rate:
            error = "failure"
        return Decision(faults, error)


def plan_error(decision: Decision) -> AppError:
    """The decided error in our own body shape, for the plan's /api/v1/{provider}/chat."""
    if decision.error == "down":
        return ProviderDown()
    if decision.error == "rate_limited":
        return SimulatedRateLimit(headers={"Retry-After": str(decision.faults.retry_after_seconds)})
    return SimulatedProviderFailure()
