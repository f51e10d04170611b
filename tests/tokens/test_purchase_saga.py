"""The purchase saga at service level, on SQLite and on PostgreSQL: steps, compensation,
idempotency, and exactly-once under concurrency and competing orchestrators."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from leaky_tokens.shared.clock import Clock, FakeClock, SystemClock
from leaky_tokens.shared.database import Database
from leaky_tokens.shared.errors import Forbidden, InvalidRequest
from leaky_tokens.shared.migrations import upgrade_database
from leaky_tokens.shared.pagination import PageRequest
from leaky_tokens.tokens.errors import (
    IdempotencyConflict,
    PurchaseLimitExceeded,
    PurchasesDisabled,
    SagaNotFound,
)
from leaky_tokens.tokens.flags import FeatureFlags
from leaky_tokens.tokens.models import StubPaymentOperation, TokenPool
from leaky_tokens.tokens.payments import StubPaymentGateway
from leaky_tokens.tokens.purchase_saga import (
    PurchaseRequest,
    PurchaseService,
    SagaOrchestrator,
)
from leaky_tokens.tokens.saga_repository import SagaRepository
from leaky_tokens.tokens.service import USER_POOL
from tests.backends import create_postgres_database, drop_postgres_database, need_postgres
from tests.tokens.conftest import admin, make_settings, user


@dataclass
class SagaRig:
    db: Database
    flags: FeatureFlags
    purchases: PurchaseService
    orchestrator: SagaOrchestrator
    payments: StubPaymentGateway

    def another_orchestrator(self, **overrides: object) -> SagaOrchestrator:
        settings = make_settings(**overrides) if overrides else self.orchestrator.settings
        return SagaOrchestrator(self.db, settings, SystemClock(), self.flags, self.payments)

    async def run_until_idle(self, *orchestrators: SagaOrchestrator) -> None:
        drivers = orchestrators or (self.orchestrator,)
        for _ in range(50):
            counts = await asyncio.gather(*(o.drive_due() for o in drivers))
            if not any(counts):
                return
        raise AssertionError("sagas still due after 50 passes")

    async def balances(self, owner: uuid.UUID) -> tuple[int, int, int] | None:
        """(allowance, allowance remaining, credit) of the owner's openai pool."""
        async with self.db.read() as session:
            row = (
                await session.execute(
                    select(
                        TokenPool.total_tokens, TokenPool.remaining_tokens, TokenPool.credit_tokens
                    ).where(TokenPool.owner_kind == USER_POOL, TokenPool.owner_id == owner)
                )
            ).one_or_none()
        return None if row is None else (row[0], row[1], row[2])

    async def trail(self, saga_id: uuid.UUID) -> list[str]:
        async with self.db.read() as session:
            events = await SagaRepository(session).events_of(saga_id)
        return [e["type"] for e in events]

    async def payment_steps(self, saga_id: uuid.UUID) -> list[str]:
        async with self.db.read() as session:
            rows = await session.execute(
                select(StubPaymentOperation.step).where(StubPaymentOperation.saga_id == saga_id)
            )
        return sorted(rows.scalars())


@pytest.fixture(params=["sqlite", "postgresql"])
async def saga(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SagaRig]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'tokens.db'}"
    else:
        need_postgres()
        url = await create_postgres_database("saga")
    await upgrade_database(url, "tokens")
    db = Database(url)
    clock = SystemClock()
    settings = make_settings(saga_retry_base_seconds=0.01, saga_max_attempts=3)
    flags = FeatureFlags(db, clock, cache_seconds=0)
    payments = StubPaymentGateway(db, clock, flags)
    orchestrator = SagaOrchestrator(db, settings, clock, flags, payments)
    purchases = PurchaseService(db, settings, clock, flags, orchestrator.wake)
    try:
        yield SagaRig(db, flags, purchases, orchestrator, payments)
    finally:
        await db.dispose()
        if request.param == "postgresql":
            await drop_postgres_database(url)


def buy(user_id: uuid.UUID, tokens: int = 500, provider: str = "openai") -> PurchaseRequest:
    return PurchaseRequest(user_id, None, provider, tokens)


SUCCESS_TRAIL = ["PurchaseStarted", "PaymentReserved", "TokensAllocated", "PurchaseCompleted"]


async def test_a_purchase_completes_and_adds_tokens_once(saga: SagaRig) -> None:
    owner = uuid.uuid4()
    started, created = await saga.purchases.start_purchase(user(owner), buy(owner), "k-1")
    assert created
    assert started.status == "STARTED"

    await saga.run_until_idle()

    done = await saga.purchases.get_purchase(user(owner), str(started.id))
    assert done.status == "COMPLETED"
    assert await saga.balances(owner) == (0, 0, 500)
    assert await saga.trail(started.id) == SUCCESS_TRAIL
    assert await saga.payment_steps(started.id) == ["capture", "reserve"]


async def test_simulated_failure_compensates_after_payment_reserved(saga: SagaRig) -> None:
    owner = uuid.uuid4()
    await saga.flags.set("saga.simulate-failure", True)
    started, _ = await saga.purchases.start_purchase(user(owner), buy(owner), "fail-1")

    await saga.run_until_idle()

    failed = await saga.purchases.get_purchase(user(owner), "fail-1")
    assert failed.status == "FAILED"
    assert failed.failure_reason
    assert "simulated" in failed.failure_reason
    assert await saga.balances(owner) is None
    assert await saga.trail(started.id) == [
        "PurchaseStarted",
        "PaymentReserved",
        "PurchaseCompensating",
        "PaymentReleased",
        "PurchaseFailed",
    ]
    assert await saga.payment_steps(started.id) == ["release", "reserve"]


async def test_a_declined_payment_fails_without_touching_the_pool(saga: SagaRig) -> None:
    owner = uuid.uuid4()
    await saga.flags.set("payment.decline", True)
    started, _ = await saga.purchases.start_purchase(user(owner), buy(owner), None)
    await saga.run_until_idle()
    assert (await saga.purchases.get_purchase(user(owner), str(started.id))).status == "FAILED"
    assert await saga.trail(started.id) == [
        "PurchaseStarted",
        "PurchaseCompensating",
        "PurchaseFailed",
    ]
    assert await saga.balances(owner) is None


async def test_a_payment_outage_is_retried_then_gives_up_and_compensates(saga: SagaRig) -> None:
    owner = uuid.uuid4()
    await saga.purchases.start_purchase(user(owner), buy(owner), "outage")
    await saga.flags.set("payment.unavailable", True)
    for _ in range(2):  # two failed tries, each scheduling a retry
        await saga.orchestrator.drive_due()
        await asyncio.sleep(0.1)
    still = await saga.purchases.get_purchase(user(owner), "outage")
    assert still.status == "STARTED"
    assert still.attempts == 2

    await saga.flags.set("payment.unavailable", False)
    await asyncio.sleep(0.1)
    await saga.run_until_idle()
    assert (await saga.purchases.get_purchase(user(owner), "outage")).status == "COMPLETED"


async def test_a_capture_failure_after_allocation_takes_the_tokens_back(saga: SagaRig) -> None:
    owner = uuid.uuid4()
    saga_row, _ = await saga.purchases.start_purchase(user(owner), buy(owner, 300), "cap")
    # The provider drops the reservation behind our back: reserve and allocation still
    # succeed, then capture is declined, so the saga must take its tokens back.
    await saga.payments.release(saga_row.id, 300)
    await saga.run_until_idle()

    final = await saga.purchases.get_purchase(user(owner), "cap")
    assert final.status == "FAILED"
    assert await saga.balances(owner) == (0, 0, 0)
    assert await saga.trail(final.id) == [
        "PurchaseStarted",
        "PaymentReserved",
        "TokensAllocated",
        "PurchaseCompensating",
        "TokensDeallocated",
        "PaymentReleased",
        "PurchaseFailed",
    ]


async def test_same_key_same_payload_is_the_same_saga_and_other_payload_conflicts(
    saga: SagaRig,
) -> None:
    owner = uuid.uuid4()
    first, _ = await saga.purchases.start_purchase(user(owner), buy(owner), "purchase-test-001")
    again, created = await saga.purchases.start_purchase(
        user(owner), buy(owner), "  purchase-test-001 "
    )
    assert not created
    assert again.id == first.id
    with pytest.raises(IdempotencyConflict):
        await saga.purchases.start_purchase(
            user(owner), buy(owner, provider="gemini"), "purchase-test-001"
        )
    other = uuid.uuid4()  # keys are scoped per user
    theirs, created = await saga.purchases.start_purchase(
        user(other), buy(other), "purchase-test-001"
    )
    assert created
    assert theirs.id != first.id


async def test_twenty_concurrent_purchases_with_one_key_make_one_saga(saga: SagaRig) -> None:
    owner = uuid.uuid4()
    results = await asyncio.gather(
        *(saga.purchases.start_purchase(user(owner), buy(owner, 100), "load") for _ in range(20))
    )
    assert len({s.id for s, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    await saga.run_until_idle()
    assert await saga.balances(owner) == (0, 0, 100)


async def test_twenty_concurrent_purchases_with_distinct_keys_all_complete(
    saga: SagaRig,
) -> None:
    owner = uuid.uuid4()
    results = await asyncio.gather(
        *(
            saga.purchases.start_purchase(user(owner), buy(owner, 100), f"load-test-{i}")
            for i in range(20)
        )
    )
    await saga.run_until_idle()
    for started, _ in results:
        done = await saga.purchases.get_purchase(user(owner), str(started.id))
        assert done.status == "COMPLETED"
    assert await saga.balances(owner) == (0, 0, 2000)


async def test_two_orchestrators_racing_complete_each_saga_exactly_once(saga: SagaRig) -> None:
    owners = [uuid.uuid4() for _ in range(10)]
    sagas = []
    for i in range(100):
        owner = owners[i % 10]
        started, _ = await saga.purchases.start_purchase(user(owner), buy(owner, 10), f"r-{i}")
        sagas.append(started.id)
    rivals = [saga.orchestrator, saga.another_orchestrator()]

    await saga.run_until_idle(*rivals)

    for owner in owners:
        assert await saga.balances(owner) == (0, 0, 100)
    async with saga.db.read() as session:
        operations = await session.scalar(select(func.count()).select_from(StubPaymentOperation))
    assert operations == 200  # one reserve and one capture per saga, never more
    for saga_id in sagas:
        assert await saga.trail(saga_id) == SUCCESS_TRAIL


async def test_a_driver_whose_lease_was_taken_over_changes_nothing(saga: SagaRig) -> None:
    owner = uuid.uuid4()
    started, _ = await saga.purchases.start_purchase(user(owner), buy(owner), "fence")
    slow = saga.another_orchestrator(saga_lease_seconds=0.05)
    async with saga.db.transaction() as session:
        claimed = await SagaRepository(session).claim_due(
            slow.owner, slow.clock.now(), timedelta(seconds=0.05), 10
        )
    assert claimed == [started.id]
    await asyncio.sleep(0.1)  # the slow driver's lease lapses; another takes over
    await saga.run_until_idle()
    assert (await saga.purchases.get_purchase(user(owner), "fence")).status == "COMPLETED"

    await slow.drive(started.id)  # the stale driver wakes up: nothing may change

    assert await saga.trail(started.id) == SUCCESS_TRAIL
    assert await saga.balances(owner) == (0, 0, 500)


async def test_rules_before_a_saga_starts(saga: SagaRig) -> None:
    owner = uuid.uuid4()
    with pytest.raises(InvalidRequest, match="Idempotency-Key"):
        await saga.purchases.start_purchase(user(owner), buy(owner), "x" * 150)
    with pytest.raises(InvalidRequest, match="at most"):
        await saga.purchases.start_purchase(user(owner), buy(owner, 10**9), None)
    with pytest.raises(Forbidden):
        await saga.purchases.start_purchase(user(uuid.uuid4()), buy(owner), None)
    await saga.flags.set("saga.purchases-enabled", False)
    with pytest.raises(PurchasesDisabled):
        await saga.purchases.start_purchase(user(owner), buy(owner), None)


async def test_another_users_saga_is_not_found(saga: SagaRig) -> None:
    owner = uuid.uuid4()
    started, _ = await saga.purchases.start_purchase(user(owner), buy(owner), "mine")
    with pytest.raises(SagaNotFound):
        await saga.purchases.get_purchase(user(uuid.uuid4()), str(started.id))
    with pytest.raises(SagaNotFound):
        await saga.purchases.get_purchase(user(uuid.uuid4()), "mine")


async def test_a_user_lists_their_own_sagas_and_an_admin_everyones(saga: SagaRig) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    mine, _ = await saga.purchases.start_purchase(user(alice), buy(alice), None)
    theirs, _ = await saga.purchases.start_purchase(user(bob), buy(bob), None)
    page = PageRequest(1, 20)
    listed, total = await saga.purchases.list_purchases(user(alice), page)
    assert ([s.id for s in listed], total) == ([mine.id], 1)
    with pytest.raises(Forbidden):
        await saga.purchases.list_purchases(user(alice), page, bob)
    everyone, total = await saga.purchases.list_purchases(admin(), page)
    assert ({s.id for s in everyone}, total) == ({mine.id, theirs.id}, 2)
    one, _ = await saga.purchases.list_purchases(admin(), page, bob)
    assert [s.id for s in one] == [theirs.id]


# -- daily purchase limits (issue 10: "the payment stub accepts any purchase") -----------------


def capped(saga: SagaRig, clock: Clock | None = None, **limits: int) -> PurchaseService:
    settings = make_settings(saga_retry_base_seconds=0.01, saga_max_attempts=3, **limits)
    return PurchaseService(
        saga.db, settings, clock or SystemClock(), saga.flags, saga.orchestrator.wake
    )


async def test_concurrent_purchases_past_the_daily_count_never_reach_the_payment_adapter(
    saga: SagaRig,
) -> None:
    owner = uuid.uuid4()
    purchases = capped(saga, max_purchases_per_user_per_day=3)

    outcomes = await asyncio.gather(
        *(purchases.start_purchase(user(owner), buy(owner, 100), f"k-{i}") for i in range(20)),
        return_exceptions=True,
    )
    await saga.run_until_idle()

    started = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, PurchaseLimitExceeded)]
    assert (len(started), len(refused)) == (3, 17), outcomes
    assert all(int(e.headers["Retry-After"]) >= 1 for e in refused)
    async with saga.db.read() as session:
        paid = await session.scalar(select(func.count(func.distinct(StubPaymentOperation.saga_id))))
    assert paid == 3  # the refused ones never reached the payment adapter
    assert await saga.balances(owner) == (0, 0, 300)


async def test_the_daily_token_cap_counts_what_was_bought_and_not_what_failed(
    saga: SagaRig,
) -> None:
    owner = uuid.uuid4()
    purchases = capped(saga, max_purchase_tokens_per_user_per_day=1000)

    await purchases.start_purchase(user(owner), buy(owner, 600), "a")
    with pytest.raises(PurchaseLimitExceeded):
        await purchases.start_purchase(user(owner), buy(owner, 600), "b")
    _, created = await purchases.start_purchase(user(owner), buy(owner, 600), "a")
    assert not created  # a replay of an accepted purchase is not a new purchase
    await saga.run_until_idle()
    await saga.flags.set("saga.simulate-failure", True)
    failing, _ = await purchases.start_purchase(user(owner), buy(owner, 400), "c")
    await saga.run_until_idle()
    assert (await purchases.get_purchase(user(owner), str(failing.id))).status == "FAILED"
    await saga.flags.set("saga.simulate-failure", False)

    await purchases.start_purchase(user(owner), buy(owner, 400), "d")  # the FAILED one is free
    with pytest.raises(PurchaseLimitExceeded):
        await purchases.start_purchase(user(owner), buy(owner, 1), "e")
    other = uuid.uuid4()
    await purchases.start_purchase(user(other), buy(other, 1000), "a")  # per user


async def test_the_daily_limits_start_again_the_next_utc_day(saga: SagaRig) -> None:
    owner = uuid.uuid4()
    clock = FakeClock(datetime(2026, 3, 1, 23, 59, tzinfo=UTC))
    purchases = capped(saga, clock, max_purchases_per_user_per_day=1)
    await purchases.start_purchase(user(owner), buy(owner), None)
    with pytest.raises(PurchaseLimitExceeded) as refused:
        await purchases.start_purchase(user(owner), buy(owner), None)
    assert refused.value.headers["Retry-After"] == "60"

    clock.advance(61)

    await purchases.start_purchase(user(owner), buy(owner), None)
