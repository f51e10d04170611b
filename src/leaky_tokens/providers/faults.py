"""Run-time fault injection for a provider stub: down, random failures and added latency."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

from leaky_tokens.shared.errors import AppError, ServiceUnavailable

log = logging.getLogger(__name__)

MAX_LATENCY_MS = 60_000


@dataclass(frozen=True, slots=True)
class Faults:
    """What the stub does wrong; the default does nothing wrong."""

    failure_rate: float = 0.0  # probability in [0, 1] that a chat call fails with a 500
    latency_ms: int = 0  # added before every chat answer, success or failure
    down: bool = False  # every chat call answers 503


class ProviderDown(ServiceUnavailable):
    default_message = "provider is down"


class SimulatedProviderFailure(AppError):
    status = 500
    code = "PROVIDER_ERROR"
    default_message = "simulated provider failure"


class FaultInjector:
    """Holds one stub's current faults (per process) and applies them to a chat call.

    Faults are replaced whole, never mutated, so a request sees one consistent set even if
    they change while it sleeps. The random source is injected so tests are deterministic.
    """

    def __init__(self, rng: random.Random, *, provider: str) -> None:
        self._rng = rng
        self._provider = provider
        self._faults = Faults()

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
            "provider faults set",
            extra={
                "provider": self._provider,
                "failureRate": faults.failure_rate,
                "latencyMs": faults.latency_ms,
                "down": faults.down,
            },
        )
        return faults

    def clear_faults(self) -> None:
        self.set_faults(Faults())

    async def apply(self) -> None:
        """Wait the configured latency, then raise the configured failure, if any."""
        faults = self._faults
        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000)
        if faults.down:
            raise ProviderDown
        # Draw only when failures are possible, so a rate of 0 leaves the random sequence alone.
        if faults.failure_rate > 0.0 and self._rng.random() < faults.failure_rate:
            raise SimulatedProviderFailure
