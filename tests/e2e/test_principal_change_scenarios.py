"""Membership and sessions change everywhere within a second (issue 10: "a user removed from an
org keeps spending and reading the org's quota with the JWT they already hold"), against a real
`leaky-tokens up` in both shapes: the old token is refused at tokens, analytics and the gateway,
and a removed member's API key loses the org there too.

Waits poll with generous deadlines (a loaded machine must not fail them); how long each service
took is printed (`-s`) and is the figure in the notes, not an assertion.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.e2e.conftest import Stack
from tests.e2e.journeys import Account, assert_error, create_api_key, login, register

pytestmark = pytest.mark.e2e

DEADLINE_SECONDS = 20.0
ORG_QUOTA = "/api/v1/tokens/quota/org"
USAGE = "/api/v1/analytics/usage"


@pytest.fixture(scope="module")
def clients(stack: Stack) -> Iterator[dict[str, httpx.Client]]:
    names = ("auth", "tokens", "analytics", "gateway")
    opened = {name: stack.client(name) for name in names}
    try:
        yield opened
    finally:
        for client in opened.values():
            client.close()


def _org_with(auth: httpx.Client, owner: Account, *members: Account) -> str:
    created = auth.post("/api/v1/auth/orgs", json={"name": "acme"}, headers=owner.bearer)
    assert created.status_code == 201, created.text
    org_id: str = created.json()["orgId"]
    for member in members:
        added = auth.post(
            f"/api/v1/auth/orgs/{org_id}/members",
            json={"userId": member.user_id},
            headers=owner.bearer,
        )
        assert added.status_code == 201, added.text
    return org_id


def _reads(
    clients: dict[str, httpx.Client], org_id: str
) -> dict[str, Callable[..., httpx.Response]]:
    """One read per service the old token must stop working at."""
    params = {"orgId": org_id, "provider": "openai"}
    return {
        "tokens": lambda h: clients["tokens"].get(ORG_QUOTA, params=params, headers=h),
        "analytics": lambda h: clients["analytics"].get(
            USAGE, params={"provider": "openai"}, headers=h
        ),
        "gateway": lambda h: clients["gateway"].get(ORG_QUOTA, params=params, headers=h),
    }


def _until(condition: Callable[[], bool], what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > DEADLINE_SECONDS:
            raise AssertionError(f"{what} after {DEADLINE_SECONDS} s")
        time.sleep(0.02)
    return time.monotonic() - started


def _refused_everywhere(
    reads: dict[str, Callable[..., httpx.Response]], headers: dict[str, str], changed_at: float
) -> dict[str, float]:
    """Seconds from the change until each service refused the old token (then it stays so)."""
    took: dict[str, float] = {}
    for name, read in reads.items():
        _until(lambda read=read: read(headers).status_code == 401, f"{name} still accepts it")
        took[name] = round(time.monotonic() - changed_at, 3)
        assert_error(read(headers), 401, "AUTH_REVOKED_TOKEN")
    return took


def test_a_removed_members_old_token_is_refused_at_tokens_analytics_and_the_gateway(
    stack: Stack, clients: dict[str, httpx.Client]
) -> None:
    auth = clients["auth"]
    owner, member = register(auth, "owner"), register(auth, "member")
    org_id = _org_with(auth, owner, member)
    owner, member = login(auth, owner), login(auth, member)  # tokens naming the org
    key = create_api_key(auth, member)
    reads = _reads(clients, org_id)
    for name, read in reads.items():  # accepted everywhere, and remembered where it is cached
        for _ in range(2):
            assert read(member.bearer).status_code in (200, 404), (name, read(member.bearer).text)
    by_key = {"X-Api-Key": key["rawKey"]}
    assert reads["tokens"](by_key).status_code == 404  # a member: no such pool, not forbidden

    removed = auth.delete(
        f"/api/v1/auth/orgs/{org_id}/members/{member.user_id}", headers=owner.bearer
    )
    changed_at = time.monotonic()
    assert removed.status_code == 204, removed.text

    took = _refused_everywhere(reads, member.bearer, changed_at)
    for name in ("tokens", "gateway"):  # the API key stays valid, without the org
        _until(lambda name=name: reads[name](by_key).status_code == 403, f"{name} key keeps org")
    print(f"\n[{stack.shape}] removed member's JWT refused after (s): {took}")

    again = login(auth, member)  # a fresh token works, without the org
    assert reads["analytics"](again.bearer).status_code == 200
    assert_error(reads["tokens"](again.bearer), 403, "FORBIDDEN")
    assert reads["tokens"](owner.bearer).status_code == 404  # nobody else was touched


def test_an_organisations_tokens_are_revoked_as_a_whole(
    stack: Stack, clients: dict[str, httpx.Client]
) -> None:
    auth = clients["auth"]
    owner, member, outsider = (register(auth, p) for p in ("owner", "member", "outsider"))
    org_id = _org_with(auth, owner, member)
    owner, member = login(auth, owner), login(auth, member)
    reads = _reads(clients, org_id)
    for read in reads.values():
        assert read(member.bearer).status_code in (200, 404)
        assert read(owner.bearer).status_code in (200, 404)

    revoked = auth.post(f"/api/v1/auth/orgs/{org_id}/revoke-tokens", headers=owner.bearer)
    changed_at = time.monotonic()
    assert revoked.status_code == 204, revoked.text

    took = _refused_everywhere(reads, member.bearer, changed_at)
    _refused_everywhere(reads, owner.bearer, changed_at)
    print(f"\n[{stack.shape}] org's tokens refused after (s): {took}")
    assert reads["analytics"](outsider.bearer).status_code == 200  # not in the org: untouched
    assert reads["tokens"](login(auth, member).bearer).status_code == 404  # still a member


def test_a_user_revoking_their_sessions_ends_every_token_they_hold(
    stack: Stack, clients: dict[str, httpx.Client]
) -> None:
    auth = clients["auth"]
    user = register(auth, "careful")
    old = login(auth, Account(user.user_id, user.username, user.password, ""))
    reads = _reads(clients, user.user_id)  # (the org read is a 403 for them; analytics is not)
    assert reads["analytics"](old.bearer).status_code == 200

    revoked = auth.post(f"/api/v1/auth/users/{user.user_id}/revoke-tokens", headers=old.bearer)
    changed_at = time.monotonic()
    assert revoked.status_code == 204, revoked.text

    took = _refused_everywhere(reads, old.bearer, changed_at)
    assert_error(auth.get("/api/v1/auth/me", headers=old.bearer), 401, "AUTH_REVOKED_TOKEN")
    print(f"\n[{stack.shape}] revoked sessions refused after (s): {took}")
    assert reads["analytics"](login(auth, user).bearer).status_code == 200
