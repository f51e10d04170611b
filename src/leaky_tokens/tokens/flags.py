"""Runtime feature flags, stored in the token database so every replica sees a change within
`cache_seconds` (the replica that made it, at once); no restart needed."""

from __future__ import annotations

from leaky_tokens.shared.clock import Clock
from leaky_tokens.shared.database import Database
from leaky_tokens.tokens.errors import UnknownFlag
from leaky_tokens.tokens.saga_repository import SagaRepository

DEFAULTS: dict[str, bool] = {
    "saga.purchases-enabled": True,
    "saga.simulate-failure": False,  # fail every purchase after PAYMENT_RESERVED (plan §5.3)
    "payment.decline": False,  # the payment stub declines reservations
    "payment.unavailable": False,  # the payment stub fails every call (retried)
}


class FeatureFlags:
    def __init__(self, database: Database, clock: Clock, cache_seconds: float = 1.0) -> None:
        self._db = database
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._cached: dict[str, bool] | None = None
        self._cached_at = float("-inf")

    async def all(self) -> dict[str, bool]:
        now = self._clock.monotonic()
        if self._cached is None or now - self._cached_at > self._cache_seconds:
            async with self._db.read() as session:
                stored = await SagaRepository(session).flags()
            self._cached = {**DEFAULTS, **{k: v for k, v in stored.items() if k in DEFAULTS}}
            self._cached_at = now
        return dict(self._cached)

    async def enabled(self, name: str) -> bool:
        return (await self.all())[name]

    async def set(self, name: str, enabled: bool) -> dict[str, bool]:
        if name not in DEFAULTS:
            raise UnknownFlag(f"no feature flag {name!r}; known: {', '.join(sorted(DEFAULTS))}")
        async with self._db.transaction() as session:
            await SagaRepository(session).set_flag(name, enabled, self._clock.now())
        self._cached = None
        return await self.all()
