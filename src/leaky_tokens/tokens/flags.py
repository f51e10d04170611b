"""Runtime feature flags, stored in the token database so every replica sees a change within
`cache_seconds` (the replica that made it, at once); no restart needed.

Who decides: settings (`tokens.flags`) seed a flag only when it was never set; once a value is
stored, the admin API's changes win on every replica and across restarts, and a restart with
other settings changes nothing (it logs the disagreement). `states()` says where each value came
from: "default" (never set), "settings" or "admin".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from leaky_tokens.shared.clock import Clock
from leaky_tokens.shared.database import Database
from leaky_tokens.tokens.errors import UnknownFlag
from leaky_tokens.tokens.saga_repository import SagaRepository

log = logging.getLogger("leaky_tokens.tokens.flags")

DEFAULTS: dict[str, bool] = {
    "saga.purchases-enabled": True,
    "saga.simulate-failure": False,  # fail every purchase after PAYMENT_RESERVED (plan §5.3)
    "payment.decline": False,  # the payment stub declines reservations
    "payment.unavailable": False,  # the payment stub fails every call (retried)
}


@dataclass(frozen=True, slots=True)
class FlagState:
    enabled: bool
    source: str  # "default" | "settings" | "admin"
    updated_at: datetime | None  # None for a default


def _check(name: str) -> None:
    if name not in DEFAULTS:
        raise UnknownFlag(f"no feature flag {name!r}; known: {', '.join(sorted(DEFAULTS))}")


class FeatureFlags:
    def __init__(self, database: Database, clock: Clock, cache_seconds: float = 1.0) -> None:
        self._db = database
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._cached: dict[str, FlagState] | None = None
        self._cached_at = float("-inf")

    async def states(self) -> dict[str, FlagState]:
        now = self._clock.monotonic()
        if self._cached is None or now - self._cached_at > self._cache_seconds:
            async with self._db.read() as session:
                stored = await SagaRepository(session).flags()
            states = {name: FlagState(value, "default", None) for name, value in DEFAULTS.items()}
            for row in stored:
                if row.name in DEFAULTS:
                    states[row.name] = FlagState(bool(row.enabled), row.source, row.updated_at)
            self._cached = states
            self._cached_at = now
        return dict(self._cached)

    async def all(self) -> dict[str, bool]:
        return {name: state.enabled for name, state in (await self.states()).items()}

    async def enabled(self, name: str) -> bool:
        return (await self.states())[name].enabled

    async def set(self, name: str, enabled: bool) -> dict[str, FlagState]:
        """An admin's change (through the API): stands until the next such change."""
        _check(name)
        async with self._db.transaction() as session:
            await SagaRepository(session).set_flag(name, enabled, self._clock.now())
        self._cached = None
        return await self.states()

    async def seed(self, values: Mapping[str, bool]) -> None:
        """Start-up values from settings, stored only for flags never set before."""
        for name in values:
            _check(name)
        now = self._clock.now()
        async with self._db.transaction() as session:
            repo = SagaRepository(session)
            kept = {
                name for name, value in values.items() if await repo.seed_flag(name, value, now)
            }
        self._cached = None
        states = await self.states()
        for name, value in values.items():
            if name not in kept and states[name].enabled != value:
                log.warning(
                    "feature flag %s: settings say %s; the stored %s (set by %s at %s) stands",
                    name,
                    value,
                    states[name].enabled,
                    states[name].source,
                    states[name].updated_at,
                )
