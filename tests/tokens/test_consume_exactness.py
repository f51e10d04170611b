"""The quota ledger and the bucket stay exact under concurrency, failures and crashes
(each test runs on SQLite + memory and on PostgreSQL + Redis)."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from leaky_tokens.shared.errors import AppError
from leaky_tokens.tokens.errors import InsufficientQuota, RateLimited
from leaky_tokens.tokens.models import OutboxEvent, Reservation
from leaky_tokens.tokens.provider_client import ProviderCallFailed
from leaky_tokens.tokens.repository import QuotaLedger, TokensRepository
from leaky_tokens.tokens.service import USER_POOL, ConsumeRequest
from tests.tokens.conftest import Rig, make_settings, user


def consume(
    user_id: uuid.UUID, tokens: int = 10, org_id: uuid.UUID | None = None
) -> ConsumeRequest:
    return ConsumeRequest(user_id, org_id, "openai", tokens, "hello")


async def outcomes(rig: Rig, user_id: uuid.UUID, count: int, tokens: int = 10) -> dict[str, int]:
    principal = user(user_id)

    async def one() -> str:
        try:
            await rig.service.consume_tokens(principal, consume(user_id, tokens), None)
        except AppError as exc:
            return type(exc).__name__
        return "ok"

    results = await asyncio.gather(*(one() for _ in range(count)))
    return {name: results.count(name) for name in set(results)}


async def reservations_left(rig: Rig) -> int:
    async with rig.db.read() as session:
        return int(await session.scalar(select(func.count()).select_from(Reservation)) or 0)


async def usage_events(rig: Rig) -> list[dict[str, object]]:
    async with rig.db.read() as session:
        rows = await TokensRepository(session).outbox("usage")
    return [dict(r.payload) for r in rows]


async def test_concurrent_consumes_never_overdraw_the_pool(rig: Rig) -> None:
    user_id = await rig.new_user_pool(1000)

    counts = await outcomes(rig, user_id, 200)

    assert counts == {"ok": 100, "InsufficientQuota": 100}
    assert await rig.remaining(user_id) == 0
    assert await reservations_left(rig) == 0
    events = await usage_events(rig)
    decisions = [e["decision"] for e in events]
    assert decisions.count("ALLOWED") == 100
    assert decisions.count("QUOTA_INSUFFICIENT") == 100
    assert sum(int(e["tokens"]) for e in events if e["allowed"]) == 1000  # type: ignore[call-overload]


@pytest.mark.parametrize(
    "token_settings", [make_settings(bucket_capacity=500, bucket_leak_per_second=0.001)]
)
async def test_bucket_never_admits_more_than_capacity_and_refunds_the_refused(rig: Rig) -> None:
    user_id = await rig.new_user_pool(100_000)
    started = time.monotonic()

    counts = await outcomes(rig, user_id, 200)

    elapsed = time.monotonic() - started
    admitted = counts.get("ok", 0)
    assert admitted * 10 <= 500 + 0.001 * elapsed + 10
    assert admitted == 50
    assert counts.get("RateLimited", 0) == 150
    assert await rig.remaining(user_id) == 100_000 - 10 * admitted
    assert await reservations_left(rig) == 0
    refused = [e for e in await usage_events(rig) if e["decision"] == "RATE_LIMITED"]
    assert len(refused) == 150
    assert all(e["refunded"] for e in refused)


async def test_provider_failures_under_concurrency_refund_exactly_what_they_reserved(
    rig: Rig,
) -> None:
    user_id = await rig.new_user_pool(100_000)
    await rig.set_faults("openai", failureRate=0.5)
    started = time.monotonic()

    counts = await outcomes(rig, user_id, 120)

    succeeded = counts.get("ok", 0)
    assert succeeded + counts.get("ProviderCallFailed", 0) == 120
    assert 0 < succeeded < 120
    assert await rig.remaining(user_id) == 100_000 - 10 * succeeded
    bucket = await rig.buckets.peek(
        f"{user_id}:openai", rig.service.bucket_config(user(user_id), user_id)
    )
    # the bucket holds only what succeeded, less what leaked meanwhile (1 token/s; a loaded
    # machine takes longer, so the allowance is the time this test took)
    leaked = math.ceil(time.monotonic() - started) + 1
    assert 10 * succeeded - leaked <= bucket.used <= 10 * succeeded
    assert await reservations_left(rig) == 0


async def test_rejections_deduct_nothing(rig: Rig) -> None:
    user_id = await rig.new_user_pool(1000, remaining=10)
    with pytest.raises(InsufficientQuota):
        await rig.service.consume_tokens(user(user_id), consume(user_id, 50), None)
    assert await rig.remaining(user_id) == 10


async def test_a_cancelled_consume_leaves_no_reservation_behind(rig: Rig) -> None:
    user_id = await rig.new_user_pool(1000)
    await rig.set_faults("openai", latencyMs=5000)
    task = asyncio.create_task(
        rig.service.consume_tokens(user(user_id), consume(user_id, 40), "req_cancelled")
    )
    deadline = time.monotonic() + 5
    while await reservations_left(rig) == 0:
        assert time.monotonic() < deadline, "reservation never appeared"
        await asyncio.sleep(0.01)
    assert await rig.remaining(user_id) == 960  # reserved while the provider call is in flight

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert await rig.remaining(user_id) == 1000
    assert await reservations_left(rig) == 0
    (abandoned,) = await usage_events(rig)
    assert abandoned["decision"] == "ABANDONED"
    assert abandoned["requestId"] == "req_cancelled"  # the request it abandoned


async def test_the_sweeper_refunds_a_crashed_reservation_exactly_once(rig: Rig) -> None:
    user_id = await rig.new_user_pool(1000)
    now = datetime.now(UTC)
    reservation_id = uuid.uuid4()
    async with rig.db.transaction() as session:  # what a process killed mid-consume leaves
        repo = QuotaLedger(session)
        reserved = await repo.reserve(
            USER_POOL, user_id, "openai", at_least=70, at_most=70, now=now, window=timedelta(days=1)
        )
        assert reserved is not None
        await repo.add_reservation(
            reserved.reservation(
                reservation_id,
                user_id=user_id,
                org_id=None,
                provider="openai",
                request_id="req_crashed",
                now=now - timedelta(minutes=5),
                expires_at=now - timedelta(minutes=1),
            )
        )
    assert await rig.remaining(user_id) == 930

    swept = await asyncio.gather(*(rig.service.sweep_expired_reservations() for _ in range(4)))

    assert sum(swept) == 1
    assert await rig.remaining(user_id) == 1000
    assert await reservations_left(rig) == 0
    (abandoned,) = await usage_events(rig)
    assert abandoned["decision"] == "ABANDONED"
    assert abandoned["requestId"] == "req_crashed"  # the request that reserved
    assert abandoned["sweptReservation"] == str(reservation_id)
    assert abandoned["refunded"] is True


async def test_an_expired_window_resets_lazily_and_reads_as_reset(rig: Rig) -> None:
    user_id = uuid.uuid4()
    past = datetime.now(UTC) - timedelta(seconds=1)
    await rig.service.put_quota(USER_POOL, user_id, "openai", total=500, remaining=0, reset_at=past)
    assert await rig.remaining(user_id) == 500  # a read reports the reset state

    await rig.service.consume_tokens(user(user_id), consume(user_id, 20), None)

    view = await rig.service.get_quota(user(user_id), USER_POOL, user_id, "openai")
    assert view.remaining_tokens == 480
    assert view.reset_at > datetime.now(UTC)


async def test_concurrent_consumes_across_an_expired_window_reset_it_once(rig: Rig) -> None:
    user_id = uuid.uuid4()
    await rig.service.put_quota(
        USER_POOL,
        user_id,
        "openai",
        total=1000,
        remaining=0,
        reset_at=datetime.now(UTC) - timedelta(seconds=1),
    )

    counts = await outcomes(rig, user_id, 150)

    assert counts == {"ok": 100, "InsufficientQuota": 50}
    assert await rig.remaining(user_id) == 0


async def test_org_consumption_charges_the_org_pool_only(rig: Rig) -> None:
    user_id = await rig.new_user_pool(1000)
    org_id = uuid.uuid4()
    await rig.service.put_quota("org", org_id, "openai", total=5000, remaining=None, reset_at=None)

    await rig.service.consume_tokens(user(user_id, org_id), consume(user_id, 100, org_id), None)

    assert await rig.remaining(org_id, "org") == 4900
    assert await rig.remaining(user_id) == 1000


async def test_provider_failure_refunds_and_reports_502(rig: Rig) -> None:
    user_id = await rig.new_user_pool(1000)
    await rig.set_faults("openai", down=True)
    with pytest.raises(ProviderCallFailed) as failure:
        await rig.service.consume_tokens(user(user_id), consume(user_id, 25), None)
    assert failure.value.status == 502
    assert await rig.remaining(user_id) == 1000
    assert [e["decision"] for e in await usage_events(rig)] == ["PROVIDER_FAILURE"]


async def test_every_decision_writes_one_usage_event_with_its_outcome(rig: Rig) -> None:
    user_id = await rig.new_user_pool(1000, remaining=15)
    principal = user(user_id)
    await rig.service.consume_tokens(principal, consume(user_id, 10), None)
    with pytest.raises(InsufficientQuota):
        await rig.service.consume_tokens(principal, consume(user_id, 10), None)
    async with rig.db.read() as session:
        count = await session.scalar(select(func.count()).select_from(OutboxEvent))
    assert count == 2
    events = await usage_events(rig)
    assert [e["type"] for e in events] == ["TokensConsumed", "ConsumptionQuotaInsufficient"]
    assert events[0]["userId"] == str(user_id)
    assert events[0]["allowed"] is True


@pytest.mark.parametrize(
    "token_settings", [make_settings(bucket_capacity=100, bucket_leak_per_second=0.001)]
)
async def test_rate_limited_answer_carries_wait_and_headers(rig: Rig) -> None:
    user_id = await rig.new_user_pool(10_000)
    await rig.service.consume_tokens(user(user_id), consume(user_id, 100), None)
    with pytest.raises(RateLimited) as refused:
        await rig.service.consume_tokens(user(user_id), consume(user_id, 10), None)
    body = refused.value.extra
    assert body["allowed"] is False
    assert body["waitSeconds"] > 0
    assert body["capacity"] == 100
    assert refused.value.headers["Retry-After"]
    assert await rig.remaining(user_id) == 9_900
