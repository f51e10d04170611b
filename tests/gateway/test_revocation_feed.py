"""Revocation is an event: the auth service's feed (and Redis announcement), and services that
follow it dropping a revoked key at once, whatever their cache time.

The auth service runs in-process (tests/auth/auth_harness.py), served on a loopback port behind
a Gate (tests/fake_http.py) that can hold answers back or refuse the feed; followers reach it
over real HTTP, as in production.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from leaky_tokens.shared.authn import REVOCATION_FEED, RemoteAuthenticator
from leaky_tokens.shared.errors import RevokedApiKey, ServiceUnavailable
from leaky_tokens.shared.events import INTERNAL_TOKEN_HEADER
from tests.auth.auth_harness import Account, AuthClient, fresh_database, running_auth
from tests.fake_http import Gate, gated

pytestmark = pytest.mark.asyncio(loop_scope="module")

VALIDATE = "/api/v1/auth/api-keys/validate"


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["sqlite", "postgresql"])
async def auth(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AuthClient]:
    directory = tmp_path_factory.mktemp("revocations")
    async with (
        fresh_database(request.param, directory) as url,
        running_auth(url, directory, login_max_attempts_per_client=10_000) as client,
    ):
        yield client


Follow = Callable[..., AbstractAsyncContextManager[tuple[RemoteAuthenticator, Gate]]]


@pytest.fixture
def follow(auth: AuthClient) -> Follow:
    @asynccontextmanager
    async def connect(**options: Any) -> AsyncIterator[tuple[RemoteAuthenticator, Gate]]:
        settings: dict[str, Any] = {
            "api_key_cache_seconds": 300,
            "revocation_poll_seconds": 0.05,
            "internal_token": auth.app.state.internal_token,
        }
        async with gated(auth.app) as (url, gate):
            authenticator = RemoteAuthenticator(url, issuer="leaky-tokens", **(settings | options))
            try:
                yield authenticator, gate
            finally:
                await authenticator.aclose()

    return connect


async def revoke(auth: AuthClient, account: Account, key: dict[str, Any]) -> None:
    response = await auth.http.delete(f"/api/v1/auth/api-keys/{key['id']}", headers=account.headers)
    assert response.status_code == 204, response.text


async def feed(auth: AuthClient, **params: Any) -> dict[str, Any]:
    response = await auth.http.get(
        REVOCATION_FEED,
        params=params,
        headers={INTERNAL_TOKEN_HEADER: auth.app.state.internal_token},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def until_refused(authenticator: RemoteAuthenticator, raw_key: str) -> float:
    """Seconds until the key is refused as revoked (gives up after 3 s)."""
    started = time.monotonic()
    while time.monotonic() - started < 3:
        try:
            await authenticator.from_api_key(raw_key)
        except RevokedApiKey:
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise AssertionError("the revoked key still works after 3 s")


# -- the feed ---------------------------------------------------------------------------------


async def test_the_feed_lists_revocations_after_a_cursor_in_order(auth: AuthClient) -> None:
    account = await auth.register()
    keys = [await auth.create_api_key(account, name=f"k{i}") for i in range(3)]
    start = await feed(auth)
    assert start["revokedKeyIds"] == []
    assert start["hasMore"] is False

    for key in keys:
        await revoke(auth, account, key)
    await revoke(auth, account, keys[0])  # again: already revoked, nothing new

    after = await feed(auth, after=start["cursor"])
    assert after["revokedKeyIds"] == [k["id"] for k in keys]
    assert after["cursor"] == start["cursor"] + 3
    first_two = await feed(auth, after=start["cursor"], limit=2)
    assert first_two["revokedKeyIds"] == [k["id"] for k in keys[:2]]
    assert first_two["hasMore"] is True
    rest = await feed(auth, after=first_two["cursor"], limit=2)
    assert rest["revokedKeyIds"] == [keys[2]["id"]]
    assert rest["hasMore"] is False
    assert (await feed(auth, after=after["cursor"]))["revokedKeyIds"] == []


@pytest.mark.parametrize("offered", [None, "", "not-the-token"], ids=["none", "empty", "wrong"])
async def test_the_feed_needs_the_internal_token(auth: AuthClient, offered: str | None) -> None:
    account = await auth.register()
    await revoke(auth, account, await auth.create_api_key(account))
    headers = {} if offered is None else {INTERNAL_TOKEN_HEADER: offered}

    response = await auth.http.get(REVOCATION_FEED, params={"after": 0}, headers=headers)

    assert response.status_code == 401, response.text
    assert response.json()["code"] == "AUTH_INVALID_INTERNAL_TOKEN"
    assert "revokedKeyIds" not in response.text


async def test_a_follower_without_the_internal_token_caches_nothing(
    auth: AuthClient, follow: Follow
) -> None:
    account = await auth.register()
    key = await auth.create_api_key(account)

    async with follow(internal_token="not-the-token") as (authenticator, gate):
        with pytest.raises(ServiceUnavailable):  # it cannot learn of revocations
            await authenticator.from_api_key(key["rawKey"])
        assert gate.paths.count(VALIDATE) == 0


async def test_a_cursor_the_feed_never_reached_is_answered_with_the_real_one(
    auth: AuthClient,
) -> None:
    current = (await feed(auth))["cursor"]

    beyond = await feed(auth, after=current + 1000)

    assert beyond["cursor"] == current  # below what the follower had: it knows to start over


async def test_a_failed_announcement_does_not_undo_the_revocation(auth: AuthClient) -> None:
    account = await auth.register()
    key = await auth.create_api_key(account)
    start = (await feed(auth))["cursor"]

    async def broken(seq: int, key_id: uuid.UUID) -> None:
        raise ConnectionError("redis down")

    auth.service.announce_revocation = broken
    try:
        await revoke(auth, account, key)
    finally:
        auth.service.announce_revocation = None

    assert (await feed(auth, after=start))["revokedKeyIds"] == [key["id"]]


# -- followers ----------------------------------------------------------------------------------


async def test_a_follower_drops_a_revoked_key_within_a_second_whatever_its_cache_time(
    auth: AuthClient, follow: Follow
) -> None:
    account = await auth.register()
    key = await auth.create_api_key(account)

    async with follow(api_key_cache_seconds=300) as (authenticator, gate):
        await authenticator.from_api_key(key["rawKey"])
        await authenticator.from_api_key(key["rawKey"])
        assert gate.paths.count(VALIDATE) == 1  # cached
        assert gate.paths[0] == REVOCATION_FEED  # the cursor came before the first answer

        await revoke(auth, account, key)
        elapsed = await until_refused(authenticator, key["rawKey"])

    assert elapsed < 1.0


async def test_an_answer_in_flight_when_the_revocation_arrives_is_not_believed(
    auth: AuthClient, follow: Follow
) -> None:
    account = await auth.register()
    key = await auth.create_api_key(account)

    async with follow() as (authenticator, gate):
        await authenticator.from_api_key((await auth.create_api_key(account))["rawKey"])
        gate.hold_path, gate.release = VALIDATE, asyncio.Event()
        pending = asyncio.create_task(authenticator.from_api_key(key["rawKey"]))
        await gate.holding.wait()  # the auth service has said "valid"; the answer waits
        await revoke(auth, account, key)
        await asyncio.sleep(0.3)  # the follower hears of it
        gate.release.set()

        with pytest.raises(RevokedApiKey):
            await pending


async def test_without_the_feed_nothing_is_cached(auth: AuthClient, follow: Follow) -> None:
    account = await auth.register()
    key = await auth.create_api_key(account)

    async with follow() as (authenticator, gate):
        await authenticator.from_api_key(key["rawKey"])
        gate.down_paths.add(REVOCATION_FEED)
        await gate.refused.wait()  # (after the long poll under way has ended)
        await asyncio.sleep(0.05)
        before = gate.paths.count(VALIDATE)
        for _ in range(3):
            await authenticator.from_api_key(key["rawKey"])
        assert gate.paths.count(VALIDATE) == before + 3  # each answer comes from auth

        gate.down_paths.clear()
        await asyncio.sleep(0.3)
        await authenticator.from_api_key(key["rawKey"])
        await authenticator.from_api_key(key["rawKey"])
        assert gate.paths.count(VALIDATE) == before + 4  # following again: cached again


async def test_a_follower_that_cannot_read_the_feed_at_all_is_unavailable(
    auth: AuthClient, follow: Follow
) -> None:
    account = await auth.register()
    key = await auth.create_api_key(account)

    async with follow() as (authenticator, gate):
        gate.down_paths.add(REVOCATION_FEED)
        with pytest.raises(ServiceUnavailable):
            await authenticator.from_api_key(key["rawKey"])


@pytest.mark.parametrize("_", [0])
async def test_with_redis_the_announcement_is_heard_at_once(
    _: int, tmp_path: Path, redis_url: str
) -> None:
    async with (
        fresh_database("sqlite", tmp_path) as url,
        running_auth(url, tmp_path, redis_url=redis_url) as auth,
    ):
        account = await auth.register()
        key = await auth.create_api_key(account)
        served = gated(auth.app)
        auth_url, _ = await served.__aenter__()
        # Polling every 30 s: only the pub/sub announcement can be this quick.
        authenticator = RemoteAuthenticator(
            auth_url,
            issuer="leaky-tokens",
            api_key_cache_seconds=300,
            revocation_poll_seconds=30,
            redis_url=redis_url,
            internal_token=auth.app.state.internal_token,
        )
        try:
            await authenticator.from_api_key(key["rawKey"])
            await asyncio.sleep(0.3)  # subscribed
            await revoke(auth, account, key)
            elapsed = await until_refused(authenticator, key["rawKey"])
        finally:
            await authenticator.aclose()
            await served.__aexit__(None, None, None)

    assert elapsed < 0.5


async def test_concurrent_requests_for_an_expired_answer_ask_the_auth_service_once(
    auth: AuthClient, follow: Follow
) -> None:
    account = await auth.register()
    key = await auth.create_api_key(account)

    async with follow(api_key_cache_seconds=0) as (authenticator, gate):
        gate.hold_path, gate.release = VALIDATE, asyncio.Event()
        callers = [
            asyncio.create_task(authenticator.from_api_key(key["rawKey"])) for _ in range(20)
        ]
        await gate.holding.wait()
        gate.release.set()
        principals = await asyncio.gather(*callers)

    assert len({p.api_key_id for p in principals}) == 1
    assert gate.paths.count(VALIDATE) == 1
