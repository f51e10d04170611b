"""Plan §2.1, §2.2, §3.2, §4.1-4.3, §8.1 (steps 1-3) and §9.1 against a real `leaky-tokens up`.

The module's stack has a small leaky bucket (capacity 100, leaking 10 tokens/s) so that §3.2
fills it in ten requests and recovers within a second, and an ADMIN who sets quotas through
`PUT /api/v1/tokens/quota[/org]` where the plan inserts rows with SQL. Every test works on fresh
users, so tests share the stack without sharing a pool or a bucket.

§9.1 runs on the same small bucket on purpose: most of its burst is refused, so the pool takes
concurrent reservations and refunds at once, and the number admitted shows the bucket is atomic.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Stack
from tests.e2e.journeys import (
    ADMIN_PASSWORD,
    Account,
    admin_env,
    assert_error,
    detail_fields,
    login,
    register,
)

pytestmark = pytest.mark.e2e

# The plan's bodies, plus what we add on purpose: when the pool's window resets, its two balances
# (the periodic allowance and the purchased credit), and how many tokens the charged pool has
# left after a consume.
BALANCE_FIELDS = {"resetAt", "allowanceTokens", "allowanceRemainingTokens", "creditTokens"}
USER_QUOTA_FIELDS = {"userId", "provider", "totalTokens", "remainingTokens", "updatedAt"}
USER_QUOTA_FIELDS |= BALANCE_FIELDS
ORG_QUOTA_FIELDS = {"orgId", "provider", "totalTokens", "remainingTokens", "updatedAt"}
ORG_QUOTA_FIELDS |= BALANCE_FIELDS
CONSUME_FIELDS = {
    "allowed",
    "capacity",
    "used",
    "remaining",
    "waitSeconds",
    "timestamp",
    "providerResponse",
    "quotaRemaining",
}
RATE_LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")

CAPACITY = 100
LEAK_PER_SECOND = 10.0
ADMIN_USERNAME = "e2e_tokens_admin"
NO_SUCH_ORG = "99999999-9999-9999-9999-999999999999"


@pytest.fixture(scope="module")
def system(stack_env: tuple[Path, dict[str, str], str]) -> Iterator[Stack]:
    workdir, env, shape = stack_env
    running = Stack(workdir, env, shape)
    running.up(
        extra_env={
            **admin_env(ADMIN_USERNAME),
            "LEAKY_TOKENS__BUCKET_CAPACITY": str(CAPACITY),
            "LEAKY_TOKENS__BUCKET_LEAK_PER_SECOND": str(LEAK_PER_SECOND),
        }
    )
    try:
        yield running
    finally:
        running.stop_all()


@pytest.fixture(scope="module")
def admin(auth: httpx.Client) -> Account:
    return login(auth, Account("", ADMIN_USERNAME, ADMIN_PASSWORD, ""))


@pytest.fixture
def user(auth: httpx.Client) -> Account:
    return register(auth)


# the plan's steps, as this module repeats them


def set_quota(
    tokens: httpx.Client,
    admin: Account,
    user_id: str,
    total: int,
    remaining: int | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"userId": user_id, "provider": "openai", "totalTokens": total}
    if remaining is not None:
        body["remainingTokens"] = remaining
    response = tokens.put("/api/v1/tokens/quota", headers=admin.bearer, json=body)
    assert response.status_code == 200, response.text
    quota: dict[str, Any] = response.json()
    return quota


def set_org_quota(tokens: httpx.Client, admin: Account, org_id: str, total: int) -> None:
    response = tokens.put(
        "/api/v1/tokens/quota/org",
        headers=admin.bearer,
        json={"orgId": org_id, "provider": "openai", "totalTokens": total},
    )
    assert response.status_code == 200, response.text


def get_quota(tokens: httpx.Client, account: Account, user_id: str | None = None) -> httpx.Response:
    return tokens.get(
        "/api/v1/tokens/quota",
        params={"userId": user_id or account.user_id, "provider": "openai"},
        headers=account.bearer,
    )


def remaining_tokens(tokens: httpx.Client, account: Account) -> int:
    response = get_quota(tokens, account)
    assert response.status_code == 200, response.text
    value: int = response.json()["remainingTokens"]
    return value


def org_remaining_tokens(tokens: httpx.Client, account: Account, org_id: str) -> int:
    response = tokens.get(
        "/api/v1/tokens/quota/org",
        params={"orgId": org_id, "provider": "openai"},
        headers=account.bearer,
    )
    assert response.status_code == 200, response.text
    value: int = response.json()["remainingTokens"]
    return value


def consume(tokens: httpx.Client, account: Account, amount: Any, **fields: Any) -> httpx.Response:
    body = {"userId": account.user_id, "provider": "openai", "tokens": amount, "prompt": "Test"}
    return tokens.post("/api/v1/tokens/consume", headers=account.bearer, json={**body, **fields})


def create_org_member(auth: httpx.Client, account: Account) -> str:
    """A new organisation owned by `account`, whose token is renewed to carry its id."""
    response = auth.post(
        "/api/v1/auth/orgs", headers=account.bearer, json={"name": f"org-{uuid.uuid4().hex[:8]}"}
    )
    assert response.status_code == 201, response.text
    org_id: str = response.json()["orgId"]
    login(auth, account)
    return org_id


# §2 quotas


def test_scenario_2_1_user_quota_management(
    tokens: httpx.Client, admin: Account, user: Account, auth: httpx.Client
) -> None:
    before = get_quota(tokens, user)
    assert_error(before, 404, "QUOTA_NOT_FOUND")

    set_quota(tokens, admin, user.user_id, 1000)
    after = get_quota(tokens, user)
    assert after.status_code == 200, after.text
    quota = after.json()
    assert quota.keys() == USER_QUOTA_FIELDS
    assert quota["userId"] == user.user_id
    assert quota["provider"] == "openai"
    assert quota["totalTokens"] == quota["remainingTokens"] == 1000
    datetime.fromisoformat(quota["updatedAt"])

    bad_uuid = get_quota(tokens, user, user_id="invalid-uuid")
    assert "userId" in detail_fields(assert_error(bad_uuid, 400, "INVALID_REQUEST"))

    no_provider = tokens.get(
        "/api/v1/tokens/quota", params={"userId": user.user_id}, headers=user.bearer
    )
    assert "provider" in detail_fields(assert_error(no_provider, 400, "INVALID_REQUEST"))

    unknown_provider = tokens.get(
        "/api/v1/tokens/quota",
        params={"userId": user.user_id, "provider": "nosuchai"},
        headers=user.bearer,
    )
    assert "provider" in detail_fields(assert_error(unknown_provider, 400, "INVALID_REQUEST"))

    other = register(auth)
    assert_error(get_quota(tokens, other, user_id=user.user_id), 403, "FORBIDDEN")

    not_admin = tokens.put(
        "/api/v1/tokens/quota",
        headers=user.bearer,
        json={"userId": user.user_id, "provider": "openai", "totalTokens": 10**6},
    )
    assert_error(not_admin, 403, "FORBIDDEN")
    overfull = tokens.put(
        "/api/v1/tokens/quota",
        headers=admin.bearer,
        json={
            "userId": user.user_id,
            "provider": "openai",
            "totalTokens": 1000,
            "remainingTokens": 2000,
        },
    )
    assert detail_fields(assert_error(overfull, 400, "INVALID_REQUEST")) == {"remainingTokens"}
    assert remaining_tokens(tokens, user) == 1000


def test_scenario_2_2_org_quota_management(
    tokens: httpx.Client, admin: Account, user: Account, auth: httpx.Client
) -> None:
    org_id = create_org_member(auth, user)
    set_org_quota(tokens, admin, org_id, 5000)

    response = tokens.get(
        "/api/v1/tokens/quota/org",
        params={"orgId": org_id, "provider": "openai"},
        headers=user.bearer,
    )
    assert response.status_code == 200, response.text
    quota = response.json()
    assert quota.keys() == ORG_QUOTA_FIELDS
    assert quota["orgId"] == org_id
    assert quota["provider"] == "openai"
    assert quota["totalTokens"] == quota["remainingTokens"] == 5000
    datetime.fromisoformat(quota["updatedAt"])

    missing = tokens.get(
        "/api/v1/tokens/quota/org",
        params={"orgId": NO_SUCH_ORG, "provider": "openai"},
        headers=admin.bearer,
    )
    assert_error(missing, 404, "QUOTA_NOT_FOUND")

    outsider = register(auth)
    for org in (org_id, NO_SUCH_ORG):
        denied = tokens.get(
            "/api/v1/tokens/quota/org",
            params={"orgId": org, "provider": "openai"},
            headers=outsider.bearer,
        )
        assert_error(denied, 403, "FORBIDDEN")


# §3.2 the leaky bucket


def test_scenario_3_2_token_bucket_rate_limiting(
    tokens: httpx.Client, admin: Account, user: Account
) -> None:
    set_quota(tokens, admin, user.user_id, 10_000)

    started = time.monotonic()
    for _ in range(CAPACITY // 10):
        allowed = consume(tokens, user, 10)
        assert allowed.status_code == 200, allowed.text
        assert allowed.json()["allowed"] is True
        assert all(h in allowed.headers for h in RATE_LIMIT_HEADERS)
        assert allowed.headers["X-RateLimit-Limit"] == str(CAPACITY)

    # The bucket is full now; the next request is refused unless a whole request's worth
    # (a second) leaked meanwhile, which only a very slow machine allows: then keep going.
    charged = CAPACITY
    for _ in range(CAPACITY // 10):
        limited = consume(tokens, user, 10)
        if limited.status_code != 200:
            break
        charged += 10
    admitted_by_leak = charged - CAPACITY
    assert admitted_by_leak <= LEAK_PER_SECOND * (time.monotonic() - started)
    body = assert_error(limited, 429, "RATE_LIMITED")
    assert body["allowed"] is False
    assert body["capacity"] == CAPACITY
    assert body["used"] + body["remaining"] == CAPACITY
    assert body["remaining"] < 10
    assert 0 < body["waitSeconds"] <= 10 / LEAK_PER_SECOND
    assert body["providerResponse"] == {}
    assert limited.headers["Retry-After"] == str(body["retryAfterSeconds"])
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.headers["X-RateLimit-Limit"] == str(CAPACITY)
    assert int(limited.headers["X-RateLimit-Remaining"]) == body["remaining"]
    assert int(limited.headers["X-RateLimit-Reset"]) >= int(time.time())
    # the refused request gave its reservation back: only the allowed ones were charged
    assert remaining_tokens(tokens, user) == 10_000 - charged

    time.sleep(body["waitSeconds"] + 0.05)
    recovered = consume(tokens, user, 10)
    assert recovered.status_code == 200, recovered.text
    assert recovered.json()["allowed"] is True
    assert remaining_tokens(tokens, user) == 10_000 - charged - 10


def test_a_request_larger_than_the_bucket_is_a_400_not_a_429(
    tokens: httpx.Client, admin: Account, user: Account
) -> None:
    set_quota(tokens, admin, user.user_id, 10_000)
    response = consume(tokens, user, CAPACITY + 1)
    body = assert_error(response, 400, "TOKENS_EXCEED_CAPACITY")
    assert "tokens" in detail_fields(body)
    assert "Retry-After" not in response.headers
    assert remaining_tokens(tokens, user) == 10_000


# §4 consumption


def test_scenario_4_1_successful_token_consumption(
    tokens: httpx.Client, admin: Account, user: Account
) -> None:
    set_quota(tokens, admin, user.user_id, 1000)
    assert remaining_tokens(tokens, user) == 1000

    response = tokens.post(
        "/api/v1/tokens/consume",
        headers={**user.bearer, "X-Request-Id": "e2e-consume-4-1"},
        json={
            "userId": user.user_id,
            "provider": "openai",
            "tokens": 50,
            "prompt": "Hello, AI! Please respond.",
        },
    )
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-Id"] == "e2e-consume-4-1"
    body = response.json()
    assert body.keys() == CONSUME_FIELDS
    assert body["allowed"] is True
    assert body["capacity"] == CAPACITY
    assert body["used"] == 50
    assert body["remaining"] == CAPACITY - 50
    assert body["waitSeconds"] == 0
    datetime.fromisoformat(body["timestamp"])
    provider_response = body["providerResponse"]
    assert provider_response.keys() >= {"id", "provider", "message"}
    assert provider_response["provider"] == "openai"
    assert provider_response["message"] == "Stubbed OpenAI response"
    assert provider_response["id"]
    assert body["quotaRemaining"] == 950
    assert response.headers["X-RateLimit-Limit"] == str(CAPACITY)
    assert response.headers["X-RateLimit-Remaining"] == str(CAPACITY - 50)

    assert remaining_tokens(tokens, user) == 950

    minted = consume(tokens, user, 1)
    assert minted.status_code == 200, minted.text
    assert minted.headers["X-Request-Id"].startswith("req_")


def test_scenario_4_2_insufficient_quota(
    tokens: httpx.Client, admin: Account, user: Account
) -> None:
    set_quota(tokens, admin, user.user_id, 1000, remaining=10)

    response = consume(tokens, user, 50, prompt="This should fail")
    body = assert_error(response, 402, "INSUFFICIENT_QUOTA")
    assert body["message"] == "insufficient token quota"

    assert remaining_tokens(tokens, user) == 10
    # the refusal took nothing from the bucket either: the whole capacity is still there
    fits = consume(tokens, user, 10)
    assert fits.status_code == 200, fits.text
    assert fits.json()["used"] == 10
    assert remaining_tokens(tokens, user) == 0


def test_scenario_4_3_org_quota_consumption(
    tokens: httpx.Client, admin: Account, user: Account, auth: httpx.Client
) -> None:
    org_id = create_org_member(auth, user)
    set_org_quota(tokens, admin, org_id, 5000)
    set_quota(tokens, admin, user.user_id, 1000)

    response = consume(tokens, user, 100, orgId=org_id, prompt="Org quota test")
    assert response.status_code == 200, response.text
    assert response.json()["allowed"] is True
    assert response.json()["quotaRemaining"] == 4900

    assert org_remaining_tokens(tokens, user, org_id) == 4900
    assert remaining_tokens(tokens, user) == 1000

    outsider = register(auth)
    set_quota(tokens, admin, outsider.user_id, 1000)
    denied = consume(tokens, outsider, 10, orgId=org_id)
    assert_error(denied, 403, "FORBIDDEN")
    assert org_remaining_tokens(tokens, user, org_id) == 4900
    assert remaining_tokens(tokens, outsider) == 1000


def test_consuming_for_another_user_is_forbidden(
    tokens: httpx.Client, admin: Account, user: Account, auth: httpx.Client
) -> None:
    set_quota(tokens, admin, user.user_id, 1000)
    other = register(auth)
    response = tokens.post(
        "/api/v1/tokens/consume",
        headers=other.bearer,
        json={"userId": user.user_id, "provider": "openai", "tokens": 10},
    )
    assert_error(response, 403, "FORBIDDEN")
    assert_error(
        tokens.post("/api/v1/tokens/consume", json={"userId": user.user_id, "tokens": 10}),
        401,
        "AUTH_INVALID_KEY",
    )
    assert remaining_tokens(tokens, user) == 1000


# §8.1 input validation


def test_scenario_8_1_input_validation(tokens: httpx.Client, admin: Account, user: Account) -> None:
    set_quota(tokens, admin, user.user_id, 1000)

    bad_uuid = get_quota(tokens, user, user_id="not-a-uuid")
    assert "userId" in detail_fields(assert_error(bad_uuid, 400, "INVALID_REQUEST"))

    missing_user = tokens.post(
        "/api/v1/tokens/consume", headers=user.bearer, json={"provider": "openai"}
    )
    body = assert_error(missing_user, 400, "INVALID_REQUEST")
    assert "userId" in detail_fields(body)
    assert "userId" in body["message"]

    negative = consume(tokens, user, -10)
    body = assert_error(negative, 400, "INVALID_REQUEST")
    assert detail_fields(body) == {"tokens"}
    assert "greater than 0" in body["details"][0]["message"]

    for amount in (0, "10", 1.5, 10**20, None, True):
        response = consume(tokens, user, amount)
        body = assert_error(response, 400, "INVALID_REQUEST")
        assert detail_fields(body) == {"tokens"}, (amount, body)

    malformed = tokens.post(
        "/api/v1/tokens/consume",
        headers={**user.bearer, "Content-Type": "application/json"},
        content=b'{"userId": "' + user.user_id.encode() + b'", "tokens": 10',
    )
    assert_error(malformed, 400, "INVALID_REQUEST")

    unknown_field = consume(tokens, user, 10, priority="high")
    assert "priority" in detail_fields(assert_error(unknown_field, 400, "INVALID_REQUEST"))

    not_an_object = tokens.post("/api/v1/tokens/consume", headers=user.bearer, json=[1, 2])
    assert_error(not_an_object, 400, "INVALID_REQUEST")

    bad_org = consume(tokens, user, 10, orgId="not-a-uuid")
    assert "orgId" in detail_fields(assert_error(bad_org, 400, "INVALID_REQUEST"))

    assert remaining_tokens(tokens, user) == 1000


# §9.1 concurrency


async def _consume_concurrently(
    base_url: str, account: Account, requests: int
) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
    async with httpx.AsyncClient(base_url=base_url, timeout=60.0, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post(
                    "/api/v1/tokens/consume",
                    headers=account.bearer,
                    json={
                        "userId": account.user_id,
                        "provider": "openai",
                        "tokens": 10,
                        "prompt": f"Concurrent test {i}",
                    },
                )
                for i in range(requests)
            )
        )


def test_scenario_9_1_concurrent_token_consumption(
    system: Stack, tokens: httpx.Client, admin: Account, user: Account
) -> None:
    initial = 100_000
    set_quota(tokens, admin, user.user_id, initial)

    started = time.monotonic()
    responses = asyncio.run(_consume_concurrently(system.url("tokens"), user, 100))
    elapsed = time.monotonic() - started

    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, sorted(statuses)
    for response in responses:
        if response.status_code == 429:
            assert_error(response, 429, "RATE_LIMITED")
    allowed = statuses.count(200)
    # The bucket starts empty, so its whole capacity is admitted; beyond that only what leaked
    # while the burst lasted: an atomic bucket never admits more.
    assert CAPACITY // 10 <= allowed <= (CAPACITY + LEAK_PER_SECOND * elapsed) // 10
    after = remaining_tokens(tokens, user)
    assert after == initial - 10 * allowed
