"""The two-balance ledger: a periodic allowance that resets every window and a purchased credit
that never does, spent after the allowance; reserve(at_least, at_most) / settle(used) exact under
concurrency and across window resets (SQLite + memory and PostgreSQL + Redis)."""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from leaky_tokens.shared.clock import FakeClock
from leaky_tokens.shared.errors import AppError
from leaky_tokens.tokens.errors import InsufficientQuota
from leaky_tokens.tokens.flags import FeatureFlags
from leaky_tokens.tokens.payments import StubPaymentGateway
from leaky_tokens.tokens.purchase_saga import PurchaseRequest, PurchaseService, SagaOrchestrator
from leaky_tokens.tokens.repository import QuotaLedger, ReservedPool, SettledReservation
from leaky_tokens.tokens.service import USER_POOL, ConsumeRequest
from tests.tokens.conftest import Rig, make_settings, user

WINDOW = 60  # seconds (make_settings below)
START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def token_settings() -> object:
    return make_settings(quota_window_seconds=WINDOW, saga_retry_base_seconds=0.01)


@dataclass
class Shop:
    purchases: PurchaseService
    orchestrator: SagaOrchestrator
    payments: StubPaymentGateway

    async def buy(self, owner: uuid.UUID, tokens: int, key: str | None = None) -> uuid.UUID:
        saga, _ = await self.purchases.start_purchase(
            user(owner), PurchaseRequest(owner, None, "openai", tokens), key
        )
        return saga.id

    async def run_until_idle(self) -> None:
        for _ in range(100):
            if not await self.orchestrator.drive_due():
                return
        raise AssertionError("sagas still due")


@pytest.fixture
def shop(rig: Rig, clock: FakeClock) -> Shop:
    flags = FeatureFlags(rig.db, clock, cache_seconds=0)
    payments = StubPaymentGateway(rig.db, clock, flags)
    settings = rig.service.settings
    orchestrator = SagaOrchestrator(rig.db, settings, clock, flags, payments)
    purchases = PurchaseService(rig.db, settings, clock, flags, orchestrator.wake)
    return Shop(purchases, orchestrator, payments)


def consume(user_id: uuid.UUID, tokens: int) -> ConsumeRequest:
    return ConsumeRequest(user_id, None, "openai", tokens, "hi")


async def new_pool(rig: Rig, total: int, remaining: int | None = None) -> uuid.UUID:
    return await rig.new_user_pool(total, remaining=remaining)


async def balances(rig: Rig, owner: uuid.UUID) -> tuple[int, int, int]:
    """(allowance, allowance left now, credit), as the quota read reports them."""
    view = await rig.quota(owner)
    return view.allowance_tokens, view.allowance_remaining, view.credit_tokens


async def reserve(
    rig: Rig, clock: FakeClock, owner: uuid.UUID, at_least: int, at_most: int
) -> tuple[uuid.UUID, ReservedPool] | None:
    reservation_id = uuid.uuid4()
    now = clock.now()
    async with rig.db.connection() as conn:
        ledger = QuotaLedger(conn)
        reserved = await ledger.reserve(
            USER_POOL,
            owner,
            "openai",
            at_least=at_least,
            at_most=at_most,
            now=now,
            window=timedelta(seconds=WINDOW),
        )
        if reserved is None:
            return None
        await ledger.add_reservation(
            reserved.reservation(
                reservation_id,
                user_id=owner,
                org_id=None,
                provider="openai",
                request_id=None,
                now=now,
                expires_at=now + timedelta(minutes=2),
            )
        )
    return reservation_id, reserved


async def settle(
    rig: Rig, clock: FakeClock, reservation_id: uuid.UUID, used: int
) -> SettledReservation | None:
    async with rig.db.connection() as conn:
        return await QuotaLedger(conn).settle(reservation_id, used, clock.now())


async def add_credit(rig: Rig, clock: FakeClock, owner: uuid.UUID, tokens: int) -> None:
    async with rig.db.connection() as conn:
        await QuotaLedger(conn).add_credit(
            USER_POOL, owner, "openai", tokens, clock.now(), timedelta(seconds=WINDOW)
        )


# the scenarios


async def test_bought_tokens_survive_a_window_reset_and_the_allowance_resets(
    rig: Rig, clock: FakeClock, shop: Shop
) -> None:
    owner = await new_pool(rig, 1000)
    await shop.buy(owner, 500, "buy-500")
    await shop.run_until_idle()
    view = await rig.quota(owner)
    assert (view.total_tokens, view.remaining_tokens) == (1500, 1500)
    assert await balances(rig, owner) == (1000, 1000, 500)

    await rig.service.consume_tokens(user(owner), consume(owner, 1200), None)
    assert await balances(rig, owner) == (1000, 0, 300)
    assert await rig.remaining(owner) == 300

    clock.advance(WINDOW + 1)  # the window resets: the allowance comes back, the credit does not
    assert await balances(rig, owner) == (1000, 1000, 300)
    view = await rig.quota(owner)
    assert (view.total_tokens, view.remaining_tokens) == (1300, 1300)

    await rig.service.consume_tokens(user(owner), consume(owner, 100), None)
    assert await balances(rig, owner) == (1000, 900, 300)  # the allowance is spent first

    clock.advance(WINDOW + 1)  # and another: still 300 of credit, never 500 again
    assert await balances(rig, owner) == (1000, 1000, 300)


async def test_spending_past_the_allowance_draws_the_credit(
    rig: Rig, clock: FakeClock, shop: Shop
) -> None:
    owner = await new_pool(rig, 100, remaining=30)
    await add_credit(rig, clock, owner, 50)

    result = await rig.service.consume_tokens(user(owner), consume(owner, 60), None)

    assert result.quota_remaining == 20
    assert await balances(rig, owner) == (100, 0, 20)
    with pytest.raises(InsufficientQuota):
        await rig.service.consume_tokens(user(owner), consume(owner, 21), None)
    assert await balances(rig, owner) == (100, 0, 20)  # a refusal deducts nothing
    events = [e for e in await _usage_events(rig) if e["decision"] == "ALLOWED"]
    assert [(e["allowanceTokens"], e["creditTokens"]) for e in events] == [(30, 30)]


async def test_a_compensated_purchase_leaves_the_credit_unchanged(
    rig: Rig, clock: FakeClock, shop: Shop
) -> None:
    owner = await new_pool(rig, 1000, remaining=700)
    await add_credit(rig, clock, owner, 200)
    saga_id = await shop.buy(owner, 300, "capture-fails")
    # The provider drops the payment behind our back: reserve and allocation succeed, capture
    # is declined, so the saga takes back exactly what it added.
    await shop.payments.release(saga_id, 300)

    await shop.run_until_idle()

    saga = await shop.purchases.get_purchase(user(owner), "capture-fails")
    assert saga.status == "FAILED"
    assert await balances(rig, owner) == (1000, 700, 200)


async def test_taking_back_credit_already_spent_leaves_a_debt_no_reset_erases(
    rig: Rig, clock: FakeClock
) -> None:
    owner = await new_pool(rig, 100, remaining=0)
    await add_credit(rig, clock, owner, 500)
    await rig.service.consume_tokens(user(owner), consume(owner, 300), None)
    assert await balances(rig, owner) == (100, 0, 200)

    async with rig.db.connection() as conn:
        left = await QuotaLedger(conn).remove_credit(USER_POOL, owner, "openai", 500, clock.now())

    assert left == -300
    assert await rig.remaining(owner) == 0
    clock.advance(WINDOW + 1)  # the new allowance pays the debt first
    view = await rig.quota(owner)
    assert (view.allowance_remaining, view.credit_tokens, view.remaining_tokens) == (100, -300, 0)
    with pytest.raises(InsufficientQuota):
        await rig.service.consume_tokens(user(owner), consume(owner, 1), None)
    await add_credit(rig, clock, owner, 250)  # a later purchase settles it
    assert await rig.remaining(owner) == 50
    await rig.service.consume_tokens(user(owner), consume(owner, 50), None)
    assert await balances(rig, owner) == (100, 50, -50)


async def test_concurrent_purchases_and_consumes_across_a_window_reset_stay_exact(
    rig: Rig, clock: FakeClock, shop: Shop
) -> None:
    """20 purchases of 100 and 200 consumes of 10 at once, while the window resets. Tokens in:
    the new window's 1000 (the old one was spent) + 2000 bought; out: what was allowed."""
    owner = uuid.uuid4()
    await rig.service.put_quota(  # spent, and the window ends one second from now
        USER_POOL,
        owner,
        "openai",
        total=1000,
        remaining=0,
        reset_at=clock.now() + timedelta(seconds=1),
    )

    async def one_consume(i: int) -> str:
        if i == 100:
            clock.advance(2)  # half-way through, the window is due
        await asyncio.sleep(0)
        try:
            await rig.service.consume_tokens(user(owner), consume(owner, 10), None)
        except AppError as exc:
            return type(exc).__name__
        return "ok"

    async def purchases() -> None:
        await asyncio.gather(*(shop.buy(owner, 100, f"p-{i}") for i in range(20)))
        await shop.run_until_idle()

    results = await asyncio.gather(purchases(), *(one_consume(i) for i in range(200)))
    outcomes = results[1:]
    allowed = outcomes.count("ok")
    assert allowed + outcomes.count("InsufficientQuota") == 200

    await shop.run_until_idle()
    allowance, left, credit = await balances(rig, owner)
    assert allowance == 1000
    assert 10 * allowed + left + credit == 1000 + 2000  # nothing made, nothing lost
    assert left >= 0
    assert credit >= 0
    events = [e for e in await _usage_events(rig) if e["decision"] == "ALLOWED"]
    assert len(events) == allowed
    # each charge recorded where it came from, and the two add up to both balances
    assert sum(int(e["allowanceTokens"]) for e in events) == 1000 - left  # type: ignore[call-overload]
    assert sum(int(e["creditTokens"]) for e in events) == 2000 - credit  # type: ignore[call-overload]


async def test_two_hundred_consumes_across_a_reset_reset_the_allowance_once(
    rig: Rig, clock: FakeClock
) -> None:
    owner = uuid.uuid4()
    await rig.service.put_quota(
        USER_POOL,
        owner,
        "openai",
        total=500,
        remaining=0,
        reset_at=clock.now() + timedelta(seconds=1),
    )
    await add_credit(rig, clock, owner, 700)

    async def one(i: int) -> bool:
        if i == 50:
            clock.advance(2)
        await asyncio.sleep(0)
        try:
            await rig.service.consume_tokens(user(owner), consume(owner, 10), None)
        except InsufficientQuota:
            return False
        return True

    allowed = sum(await asyncio.gather(*(one(i) for i in range(200))))

    # 700 of credit + one fresh window of 500 = 1200 = 120 consumes, however they interleave
    assert allowed == 120
    assert await balances(rig, owner) == (500, 0, 0)


# reserve(at_least, at_most) and settle(used): the metered path's primitives


async def test_reserve_takes_up_to_at_most_if_at_least_is_there(rig: Rig, clock: FakeClock) -> None:
    owner = await new_pool(rig, 100)
    await add_credit(rig, clock, owner, 30)

    first = await reserve(rig, clock, owner, at_least=10, at_most=500)
    assert first is not None
    assert (first[1].reserved, first[1].from_allowance, first[1].from_credit) == (130, 100, 30)
    assert await reserve(rig, clock, owner, at_least=1, at_most=5) is None
    assert await balances(rig, owner) == (100, 0, 0)

    settled = await settle(rig, clock, first[0], used=40)
    assert settled is not None
    # 90 back: the credit part first (30), then the allowance (60)
    assert (settled.credit_refunded, settled.allowance_refunded) == (30, 60)
    assert (settled.used_allowance, settled.used_credit) == (40, 0)
    assert await balances(rig, owner) == (100, 60, 30)

    partial = await reserve(rig, clock, owner, at_least=50, at_most=200)
    assert partial is not None
    assert (partial[1].reserved, partial[1].from_allowance, partial[1].from_credit) == (90, 60, 30)
    assert await reserve(rig, clock, owner, at_least=1, at_most=1) is None


async def test_settle_charges_refunds_and_settles_once(rig: Rig, clock: FakeClock) -> None:
    owner = await new_pool(rig, 100)
    taken = await reserve(rig, clock, owner, at_least=50, at_most=50)
    assert taken is not None
    with pytest.raises(ValueError, match="used"):
        await settle(rig, clock, taken[0], used=51)  # rolled back: still reserved
    full = await settle(rig, clock, taken[0], used=50)
    assert full is not None
    assert full.refunded == 0
    assert await settle(rig, clock, taken[0], used=0) is None  # someone settled it already
    assert await balances(rig, owner) == (100, 50, 0)

    again = await reserve(rig, clock, owner, at_least=20, at_most=20)
    assert again is not None
    refund = await settle(rig, clock, again[0], used=0)
    assert refund is not None
    assert refund.refunded == 20
    assert await balances(rig, owner) == (100, 50, 0)


async def test_a_refund_after_a_window_reset_drops_the_allowance_part_only(
    rig: Rig, clock: FakeClock
) -> None:
    owner = await new_pool(rig, 100)
    await add_credit(rig, clock, owner, 50)
    taken = await reserve(rig, clock, owner, at_least=1, at_most=130)
    assert taken is not None
    assert (taken[1].from_allowance, taken[1].from_credit) == (100, 30)

    clock.advance(WINDOW + 1)
    assert await reserve(rig, clock, owner, at_least=1, at_most=10) is not None  # resets it
    settled = await settle(rig, clock, taken[0], used=20)

    assert settled is not None
    # 110 to give back: 30 to the credit, 80 to an allowance whose window is over (dropped)
    assert settled.credit_refunded == 30
    assert (settled.allowance_refunded, settled.allowance_refund_dropped) == (0, 80)
    assert await balances(rig, owner) == (100, 90, 50)


async def test_concurrent_partial_settlements_account_for_every_token(
    rig: Rig, clock: FakeClock
) -> None:
    """Metered calls: each reserves 5..40, uses some random part of it, and settles."""
    owner = await new_pool(rig, 1000)
    await add_credit(rig, clock, owner, 500)
    rng = random.Random(11)
    # the fraction of its reservation each call uses: none, some, or all of it
    plans = [rng.choice([0.0, 1.0, rng.random()]) for _ in range(150)]

    async def metered(fraction: float) -> SettledReservation | None:
        taken = await reserve(rig, clock, owner, at_least=5, at_most=40)
        if taken is None:
            return None
        await asyncio.sleep(0)  # other calls reserve and settle meanwhile
        return await settle(rig, clock, taken[0], used=round(taken[1].reserved * fraction))

    settled = [s for s in await asyncio.gather(*(metered(f) for f in plans)) if s is not None]

    _allowance, left, credit = await balances(rig, owner)
    assert sum(s.used for s in settled) == (1000 - left) + (500 - credit)
    assert sum(s.used_allowance for s in settled) == 1000 - left
    assert sum(s.used_credit for s in settled) == 500 - credit
    assert any(0 < s.used < s.reserved for s in settled)
    assert left >= 0
    assert credit >= 0


async def _usage_events(rig: Rig) -> list[dict[str, object]]:
    from leaky_tokens.tokens.repository import TokensRepository

    async with rig.db.read() as session:
        rows = await TokensRepository(session).outbox("usage")
    return [dict(r.payload) for r in rows]
