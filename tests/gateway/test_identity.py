"""The edge remembers bearer tokens it verified, never past their expiry."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import jwt
import pytest

from leaky_tokens.gateway.identity import EdgeAuthenticator
from leaky_tokens.shared.clock import FakeClock
from leaky_tokens.shared.errors import ExpiredToken
from leaky_tokens.shared.principal import Principal


class Verifier:
    """Stands in for the JWKS check: counts calls, refuses tokens once the clock passes exp."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls = 0

    async def from_bearer(self, token: str) -> Principal:
        self.calls += 1
        claims = jwt.decode(token, options={"verify_signature": False})
        if claims["exp"] <= self.clock.now().timestamp():
            raise ExpiredToken()
        return Principal(user_id=uuid.UUID(claims["sub"]), roles=frozenset({"USER"}))

    async def from_api_key(self, raw_key: str) -> Principal:
        raise AssertionError("not used")


def token_expiring_at(moment: float) -> str:
    return jwt.encode({"sub": str(uuid.uuid4()), "exp": int(moment)}, "k" * 32, algorithm="HS256")


async def test_a_verified_token_is_remembered_until_it_expires() -> None:
    clock = FakeClock(datetime(2026, 1, 1, tzinfo=UTC))
    inner = Verifier(clock)
    edge = EdgeAuthenticator(inner, clock=clock, remember_seconds=60)
    token = token_expiring_at(clock.now().timestamp() + 30)

    first = await edge.from_bearer(token)
    for _ in range(10):
        assert await edge.from_bearer(token) == first
    assert inner.calls == 1

    clock.advance(30)
    with pytest.raises(ExpiredToken):
        await edge.from_bearer(token)
    assert inner.calls == 2


async def test_a_long_lived_token_is_verified_again_after_the_memory_time() -> None:
    clock = FakeClock(datetime(2026, 1, 1, tzinfo=UTC))
    inner = Verifier(clock)
    edge = EdgeAuthenticator(inner, clock=clock, remember_seconds=60)
    token = token_expiring_at(clock.now().timestamp() + 3600)

    await edge.from_bearer(token)
    clock.advance(59)
    await edge.from_bearer(token)
    assert inner.calls == 1
    clock.advance(1)
    await edge.from_bearer(token)
    assert inner.calls == 2
