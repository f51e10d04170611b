"""Principal changes at the auth service and at a follower (RemoteAuthenticator, as tokens,
analytics and the gateway run it): role changes, revoked sessions, removed members' API keys,
and what a follower does while it cannot read the feed. tests/e2e/test_principal_change_scenarios.py
shows the same end to end at every service; waits here poll with generous deadlines."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from leaky_tokens.shared.authn import REVOCATION_FEED, RemoteAuthenticator
from leaky_tokens.shared.errors import RevokedToken, ServiceUnavailable
from leaky_tokens.shared.events import INTERNAL_TOKEN_HEADER
from leaky_tokens.shared.principal import Principal
from tests.auth.auth_harness import Account, AuthClient, assert_error
from tests.fake_http import Gate, gated

pytestmark = pytest.mark.asyncio(loop_scope="module")

DEADLINE = 15.0


@asynccontextmanager
async def follower(
    auth: AuthClient, **options: Any
) -> AsyncIterator[tuple[RemoteAuthenticator, Gate]]:
    async with gated(auth.app) as (url, gate):
        authenticator = RemoteAuthenticator(
            url,
            issuer="leaky-tokens",
            **(
                {
                    "api_key_cache_seconds": 300,
                    "revocation_poll_seconds": 0.05,
                    "internal_token": auth.app.state.internal_token,
                }
                | options
            ),
        )
        try:
            yield authenticator, gate
        finally:
            await authenticator.aclose()


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < DEADLINE, what
        await asyncio.sleep(0.02)


async def refused(authenticator: RemoteAuthenticator, token: str) -> bool:
    try:
        await authenticator.from_bearer(token)
    except RevokedToken:
        return True
    return False


async def set_roles(auth: AuthClient, admin: Account, user: Account, roles: list[str]) -> Any:
    return await auth.http.put(
        f"/api/v1/auth/admin/users/{user.user_id}/roles",
        json={"roles": roles},
        headers=admin.headers,
    )


async def test_an_admin_changing_roles_ends_the_users_older_tokens(auth: AuthClient) -> None:
    admin, user = await auth.admin(), await auth.register()
    old = await auth.log_in(user.username, user.password)

    async with follower(auth) as (remote, _):
        assert (await remote.from_bearer(old.token)).roles == frozenset({"USER"})

        answer = await set_roles(auth, admin, user, ["USER", "ADMIN"])
        assert answer.status_code == 200, answer.text
        assert answer.json()["roles"] == ["ADMIN", "USER"]

        await eventually(lambda: refused(remote, old.token), "the follower accepts the old roles")
        assert_error(await auth.me(old.headers), 401, "AUTH_REVOKED_TOKEN")
        fresh = await auth.log_in(user.username, user.password)
        assert (await remote.from_bearer(fresh.token)).roles == frozenset({"USER", "ADMIN"})
        assert (await auth.me(admin.headers)).status_code == 200  # nobody else was touched


async def test_only_an_admin_changes_roles_and_only_to_known_ones(auth: AuthClient) -> None:
    admin, user, other = await auth.admin(), await auth.register(), await auth.register()

    assert_error(await set_roles(auth, user, other, ["USER", "ADMIN"]), 403, "FORBIDDEN")
    assert_error(await set_roles(auth, admin, other, ["ADMIN"]), 400, "INVALID_REQUEST")
    assert_error(await set_roles(auth, admin, other, ["USER", "ROOT"]), 400, "INVALID_REQUEST")
    unchanged = await set_roles(auth, admin, other, ["USER"])  # no change: old tokens stay good
    assert unchanged.status_code == 200
    assert (await auth.me(other.headers)).status_code == 200


async def test_a_user_may_revoke_only_their_own_sessions(auth: AuthClient) -> None:
    user, other = await auth.register(), await auth.register()

    refused_answer = await auth.http.post(
        f"/api/v1/auth/users/{other.user_id}/revoke-tokens", headers=user.headers
    )

    assert_error(refused_answer, 403, "FORBIDDEN")
    assert (await auth.me(other.headers)).status_code == 200


async def test_a_removed_members_cached_api_key_answer_is_asked_again(auth: AuthClient) -> None:
    owner, member = await auth.register(), await auth.register()
    org = await auth.http.post("/api/v1/auth/orgs", json={"name": "acme"}, headers=owner.headers)
    org_id = org.json()["orgId"]
    added = await auth.http.post(
        f"/api/v1/auth/orgs/{org_id}/members",
        json={"userId": member.user_id},
        headers=owner.headers,
    )
    assert added.status_code == 201, added.text
    key = await auth.create_api_key(member)

    async with follower(auth) as (remote, _):
        before: Principal = await remote.from_api_key(key["rawKey"])
        assert uuid.UUID(org_id) in before.org_ids  # cached for 300 s from here

        removed = await auth.http.delete(
            f"/api/v1/auth/orgs/{org_id}/members/{member.user_id}", headers=owner.headers
        )
        assert removed.status_code == 204

        async def org_gone() -> bool:
            return uuid.UUID(org_id) not in (await remote.from_api_key(key["rawKey"])).org_ids

        await eventually(org_gone, "the cached key answer keeps the org")


async def test_the_feed_tells_a_starting_follower_of_recent_principal_changes(
    auth: AuthClient,
) -> None:
    user = await auth.register()
    revoked = await auth.http.post(
        f"/api/v1/auth/users/{user.user_id}/revoke-tokens", headers=user.headers
    )
    assert revoked.status_code == 204

    start = await auth.http.get(
        REVOCATION_FEED, headers={INTERNAL_TOKEN_HEADER: auth.app.state.internal_token}
    )

    body = start.json()
    assert body["revokedKeyIds"] == []
    mine = [c for c in body["changes"] if c["userId"] == user.user_id]
    assert [(c["kind"], c["seq"] <= body["cursor"]) for c in mine] == [("user", True)]
    async with follower(auth) as (remote, _):  # a follower starting after the change
        with pytest.raises(RevokedToken):
            await remote.from_bearer(user.token)


async def test_a_follower_that_cannot_read_the_feed_refuses_tokens_after_its_grace(
    auth: AuthClient,
) -> None:
    user = await auth.register()
    async with follower(auth, feed_grace_seconds=0.5) as (remote, gate):
        await remote.from_bearer(user.token)
        gate.down_paths.add(REVOCATION_FEED)
        await gate.refused.wait()

        async def unavailable() -> bool:
            try:
                await remote.from_bearer(user.token)
            except ServiceUnavailable:
                return True
            return False

        await eventually(unavailable, "tokens accepted without the feed past the grace")
        gate.down_paths.clear()

        async def accepted() -> bool:
            try:
                await remote.from_bearer(user.token)
            except ServiceUnavailable:
                return False
            return True

        await eventually(accepted, "tokens still refused once the feed is back")
