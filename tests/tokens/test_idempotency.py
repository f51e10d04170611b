"""The claims of idempotent inference (issue 12) on the token service's database, SQLite and
PostgreSQL alike: one holder per key however many race for it, replay of a completed answer,
422 for another body, 409 while in flight, take-over after a crashed holder's lease, sweeping."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from leaky_tokens.settings import InferenceSettings
from leaky_tokens.shared.clock import FakeClock
from leaky_tokens.tokens.idempotency import (
    Claim,
    IdempotencyInFlight,
    IdempotencyKeyReused,
    IdempotencyKeys,
    Replay,
    checked_key,
    fingerprint,
)
from leaky_tokens.tokens.inference.errors import InvalidInferenceRequest
from tests.tokens.conftest import Rig

SETTINGS = InferenceSettings(idempotency_ttl_seconds=3600, idempotency_lease_seconds=60)


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def keys(rig: Rig, fake_clock: FakeClock) -> IdempotencyKeys:
    return IdempotencyKeys(rig.db, SETTINGS, fake_clock)


def scope() -> str:
    return f"key:{uuid.uuid4()}"


async def test_a_completed_key_replays_its_answer_and_another_body_is_refused(
    keys: IdempotencyKeys,
) -> None:
    who, body = scope(), fingerprint("/v1/chat/completions", b'{"a": 1, "b": 2}')
    claim = await keys.claim(who, "k1", body)
    assert isinstance(claim, Claim)
    await keys.complete(claim, 200, "application/json", b'{"id":"chatcmpl-1"}')
    # Key order and spacing do not make another body.
    same = fingerprint("/v1/chat/completions", b'{"b":2,"a":1}')
    replay = await keys.claim(who, "k1", same)
    assert replay == Replay(200, "application/json", b'{"id":"chatcmpl-1"}')
    with pytest.raises(IdempotencyKeyReused) as reused:
        await keys.claim(who, "k1", fingerprint("/v1/chat/completions", b'{"a": 2}'))
    assert reused.value.status == 422
    # Another path is another request too.
    with pytest.raises(IdempotencyKeyReused):
        await keys.claim(who, "k1", fingerprint("/v1/responses", b'{"a": 1, "b": 2}'))
    # Keys are per scope: another API key may use the same string.
    assert isinstance(await keys.claim(scope(), "k1", same), Claim)


async def test_a_key_in_flight_answers_409_with_a_retry_hint_and_a_released_key_runs_again(
    keys: IdempotencyKeys,
) -> None:
    who, body = scope(), fingerprint("/v1/responses", b"{}")
    first = await keys.claim(who, "k", body)
    assert isinstance(first, Claim)
    with pytest.raises(IdempotencyInFlight) as busy:
        await keys.claim(who, "k", body)
    assert busy.value.status == 409
    assert busy.value.headers["Retry-After"] == "1"
    assert int(busy.value.headers["retry-after-ms"]) > 0
    await keys.release(first)  # the call failed: nothing kept
    assert isinstance(await keys.claim(who, "k", body), Claim)


async def test_a_crashed_holder_is_taken_over_after_its_lease_and_cannot_complete_later(
    keys: IdempotencyKeys, fake_clock: FakeClock
) -> None:
    who, body = scope(), fingerprint("/v1/chat/completions", b"{}")
    crashed = await keys.claim(who, "k", body)
    assert isinstance(crashed, Claim)
    fake_clock.advance(59)
    with pytest.raises(IdempotencyInFlight):
        await keys.claim(who, "k", body)
    fake_clock.advance(2)  # the lease (60 s) ran out
    heir = await keys.claim(who, "k", body)
    assert isinstance(heir, Claim)
    assert heir.owner != crashed.owner
    await keys.complete(crashed, 200, "application/json", b"late")  # ignored: not the holder
    await keys.release(crashed)  # ignored too
    await keys.complete(heir, 200, "application/json", b"answer")
    assert await keys.claim(who, "k", body) == Replay(200, "application/json", b"answer")


async def test_many_concurrent_claims_of_one_key_have_exactly_one_holder(
    keys: IdempotencyKeys,
) -> None:
    who, body = scope(), fingerprint("/v1/chat/completions", b'{"n": 1}')
    outcomes = await asyncio.gather(
        *(keys.claim(who, "hot", body) for _ in range(20)), return_exceptions=True
    )
    holders = [o for o in outcomes if isinstance(o, Claim)]
    assert len(holders) == 1
    assert all(isinstance(o, IdempotencyInFlight) for o in outcomes if o not in holders)


async def test_expired_keys_are_swept_and_then_run_afresh(
    keys: IdempotencyKeys, fake_clock: FakeClock
) -> None:
    who, body = scope(), fingerprint("/v1/chat/completions", b"{}")
    claim = await keys.claim(who, "old", body)
    assert isinstance(claim, Claim)
    await keys.complete(claim, 200, "application/json", b"kept")
    kept = await keys.claim(scope(), "young", body)
    assert isinstance(kept, Claim)
    fake_clock.advance(1800)
    await keys.complete(kept, 200, "application/json", b"young")  # expires 1 h from now
    fake_clock.advance(1801)  # "old" is past its 24 h (here 1 h)
    assert await keys.sweep() >= 1
    fresh = await keys.claim(who, "old", fingerprint("/v1/chat/completions", b'{"x": 1}'))
    assert isinstance(fresh, Claim)  # gone: the key may start a new request


@pytest.mark.parametrize("bad", ["", "x" * 256, "naïve", "line\nbreak"])
def test_a_malformed_key_is_a_400_naming_the_header(bad: str) -> None:
    with pytest.raises(InvalidInferenceRequest) as refused:
        checked_key(bad)
    assert refused.value.details is not None
    assert refused.value.details[0]["field"] == "Idempotency-Key"
