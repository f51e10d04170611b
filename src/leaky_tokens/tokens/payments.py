"""The payment adapter the purchase saga calls, and the in-process payment stub behind it.

Every call is keyed by (saga id, step), so a retried or replayed call never charges, captures
or releases twice. The stub keeps its ledger in its own table and its own transactions, as an
external payment provider would.
"""

from __future__ import annotations

import uuid
from typing import Protocol

from leaky_tokens.shared.clock import Clock
from leaky_tokens.shared.database import Database
from leaky_tokens.tokens.flags import FeatureFlags
from leaky_tokens.tokens.saga_repository import SagaRepository


class PaymentError(Exception):
    """`permanent` errors (a decline) end the saga; others are retried with back-off."""

    permanent = False


class PaymentDeclined(PaymentError):
    permanent = True


class PaymentUnavailable(PaymentError):
    permanent = False


class PaymentGateway(Protocol):
    async def reserve(self, saga_id: uuid.UUID, amount: int) -> None: ...

    async def capture(self, saga_id: uuid.UUID, amount: int) -> None: ...

    async def release(self, saga_id: uuid.UUID, amount: int) -> None: ...


class StubPaymentGateway:
    """Accepts everything unless the flags `payment.decline` (reserve is declined) or
    `payment.unavailable` (every call fails, transiently) are on."""

    def __init__(self, database: Database, clock: Clock, flags: FeatureFlags) -> None:
        self._db = database
        self._clock = clock
        self._flags = flags

    async def _record(self, saga_id: uuid.UUID, step: str, amount: int) -> set[str]:
        if await self._flags.enabled("payment.unavailable"):
            raise PaymentUnavailable("payment provider unavailable")
        async with self._db.transaction() as session:
            repo = SagaRepository(session)
            done = await repo.payment_steps(saga_id)
            if step not in done:
                await repo.record_payment_operation(saga_id, step, amount, self._clock.now())
        return done

    async def reserve(self, saga_id: uuid.UUID, amount: int) -> None:
        if await self._flags.enabled("payment.decline"):
            raise PaymentDeclined("payment declined")
        await self._record(saga_id, "reserve", amount)

    async def capture(self, saga_id: uuid.UUID, amount: int) -> None:
        done = await self._record(saga_id, "capture", amount)
        if "release" in done:
            raise PaymentDeclined("payment was already released")

    async def release(self, saga_id: uuid.UUID, amount: int) -> None:
        await self._record(saga_id, "release", amount)
