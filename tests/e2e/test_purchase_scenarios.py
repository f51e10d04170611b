"""Plan §5.1-5.3, §8.1 step 4 and §9.2 against a real `leaky-tokens up`: the purchase saga.

A purchase answers 202 at once and an orchestrator inside the token service finishes it, so every
test polls the saga (bounded) until it ends, then checks three things: its status, its pool, and
its outbox trail (`GET /purchase/{ref}/events`), which names each step and compensation once.
The plan's §5.3 edits a property file and restarts; here an ADMIN switches the flag at run time.
Flags are shared by the whole module's stack, so a test that changes one puts it back.
"""

from __future__ import annotations

import asyncio
import http.client
import json
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

ACCEPTED_FIELDS = {"sagaId", "status", "createdAt"}
# The plan's body, plus why a saga failed (null unless it did).
SAGA_FIELDS = {
    "id",
    "userId",
    "orgId",
    "provider",
    "tokens",
    "idempotencyKey",
    "status",
    "createdAt",
    "updatedAt",
    "failureReason",
}
SUCCESS_TRAIL = [
    ("PurchaseStarted", "STARTED"),
    ("PaymentReserved", "PAYMENT_RESERVED"),
    ("TokensAllocated", "TOKENS_ALLOCATED"),
    ("PurchaseCompleted", "COMPLETED"),
]
FAILURE_TRAIL = [
    ("PurchaseStarted", "STARTED"),
    ("PaymentReserved", "PAYMENT_RESERVED"),
    ("PurchaseCompensating", "COMPENSATING"),
    ("PaymentReleased", "COMPENSATING"),
    ("PurchaseFailed", "FAILED"),
]
TERMINAL = ("COMPLETED", "FAILED")

ADMIN_USERNAME = "e2e_purchase_admin"
MAX_PURCHASE = 100_000
SAGA_TIMEOUT = 10.0
RETRY_BASE = 0.05
# A purchase needs only auth (callers) and tokens; the rest would only slow the start.
NOT_NEEDED = "gateway,analytics,qwen,gemini,openai"


@pytest.fixture(scope="module")
def system(stack_env: tuple[Path, dict[str, str], str]) -> Iterator[Stack]:
    workdir, env, shape = stack_env
    running = Stack(workdir, env, shape)
    running.up(
        "--skip",
        NOT_NEEDED,
        extra_env={
            **admin_env(ADMIN_USERNAME),
            "LEAKY_TOKENS__MAX_PURCHASE_TOKENS": str(MAX_PURCHASE),
            # a payment call that fails transiently is retried after 0.1, 0.2, 0.4, 0.8 s
            "LEAKY_TOKENS__SAGA_RETRY_BASE_SECONDS": str(RETRY_BASE),
        },
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


def purchase(
    tokens: httpx.Client,
    account: Account,
    key: str | None,
    amount: Any = 500,
    provider: str = "openai",
    **fields: Any,
) -> httpx.Response:
    headers = dict(account.bearer)
    if key is not None:
        headers["Idempotency-Key"] = key
    body = {"userId": account.user_id, "provider": provider, "tokens": amount, **fields}
    return tokens.post("/api/v1/tokens/purchase", headers=headers, json=body)


def purchase_with_raw_key(
    tokens: httpx.Client, account: Account, raw_key: str, amount: int = 500
) -> httpx.Response:
    """A purchase whose Idempotency-Key is sent byte for byte: httpx refuses a header value with
    surrounding spaces, http.client sends it as given (the server's HTTP parser then drops them,
    and the service trims what is left)."""
    body = json.dumps({"userId": account.user_id, "provider": "openai", "tokens": amount})
    connection = http.client.HTTPConnection(tokens.base_url.host, tokens.base_url.port, timeout=30)
    try:
        connection.request(
            "POST",
            "/api/v1/tokens/purchase",
            body=body,
            headers={
                **account.bearer,
                "Content-Type": "application/json",
                "Idempotency-Key": raw_key,
            },
        )
        raw = connection.getresponse()
        return httpx.Response(raw.status, headers=raw.getheaders(), content=raw.read())
    finally:
        connection.close()


def accepted(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    assert body.keys() == ACCEPTED_FIELDS, body
    uuid.UUID(body["sagaId"])
    datetime.fromisoformat(body["createdAt"])
    return body


def get_saga(tokens: httpx.Client, account: Account, reference: str) -> httpx.Response:
    return tokens.get(f"/api/v1/tokens/purchase/{reference}", headers=account.bearer)


def wait_for_end(
    tokens: httpx.Client, account: Account, reference: str, timeout: float = SAGA_TIMEOUT
) -> dict[str, Any]:
    """Poll the saga until COMPLETED or FAILED; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        response = get_saga(tokens, account, reference)
        assert response.status_code == 200, response.text
        saga: dict[str, Any] = response.json()
        if not seen or seen[-1] != saga["status"]:
            seen.append(saga["status"])
        if saga["status"] in TERMINAL:
            return saga
        assert time.monotonic() < deadline, f"saga {reference} still not done: {seen}"
        time.sleep(0.05)


def trail(tokens: httpx.Client, account: Account, reference: str) -> list[tuple[str, str]]:
    response = tokens.get(f"/api/v1/tokens/purchase/{reference}/events", headers=account.bearer)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] == len(body["items"])
    saga_ids = {item["sagaId"] for item in body["items"]}
    assert len(saga_ids) == 1, saga_ids
    assert len({item["eventId"] for item in body["items"]}) == body["count"]
    return [(item["type"], item["status"]) for item in body["items"]]


def quota(tokens: httpx.Client, account: Account, provider: str = "openai") -> httpx.Response:
    return tokens.get(
        "/api/v1/tokens/quota",
        params={"userId": account.user_id, "provider": provider},
        headers=account.bearer,
    )


def pool(tokens: httpx.Client, account: Account, provider: str = "openai") -> tuple[int, int]:
    """(totalTokens, remainingTokens) of the user's pool."""
    response = quota(tokens, account, provider)
    assert response.status_code == 200, response.text
    body = response.json()
    return body["totalTokens"], body["remainingTokens"]


def set_quota(
    tokens: httpx.Client, admin: Account, account: Account, total: int, remaining: int
) -> None:
    response = tokens.put(
        "/api/v1/tokens/quota",
        headers=admin.bearer,
        json={
            "userId": account.user_id,
            "provider": "openai",
            "totalTokens": total,
            "remainingTokens": remaining,
        },
    )
    assert response.status_code == 200, response.text


def set_flag(tokens: httpx.Client, admin: Account, name: str, enabled: bool) -> None:
    response = tokens.put(
        f"/api/v1/tokens/admin/flags/{name}", headers=admin.bearer, json={"enabled": enabled}
    )
    assert response.status_code == 200, response.text
    assert response.json()["flags"][name] is enabled


# §5.1


def test_scenario_5_1_successful_token_purchase(
    tokens: httpx.Client, admin: Account, user: Account, auth: httpx.Client
) -> None:
    # a user without a pool: the purchase creates it
    assert_error(quota(tokens, user), 404, "QUOTA_NOT_FOUND")

    started = accepted(purchase(tokens, user, "purchase-test-001"))
    assert started["status"] == "STARTED"

    saga = wait_for_end(tokens, user, started["sagaId"])
    assert saga.keys() == SAGA_FIELDS
    assert saga == {
        **saga,
        "id": started["sagaId"],
        "userId": user.user_id,
        "orgId": None,
        "provider": "openai",
        "tokens": 500,
        "idempotencyKey": "purchase-test-001",
        "status": "COMPLETED",
        "failureReason": None,
    }
    assert datetime.fromisoformat(saga["createdAt"]) == datetime.fromisoformat(started["createdAt"])
    assert datetime.fromisoformat(saga["updatedAt"]) >= datetime.fromisoformat(saga["createdAt"])
    assert pool(tokens, user) == (500, 500)
    assert trail(tokens, user, started["sagaId"]) == SUCCESS_TRAIL

    # the saga is listed among the caller's purchases
    listed = tokens.get("/api/v1/tokens/purchases", headers=user.bearer)
    assert listed.status_code == 200, listed.text
    page = listed.json()
    assert [item["id"] for item in page["items"]] == [started["sagaId"]]
    assert page["items"][0] == saga
    assert page["pagination"] == {"page": 1, "page_size": 20, "total": 1, "total_pages": 1}

    # a user whose pool exists (partly spent): the purchase adds to total and remaining
    other = register(auth)
    set_quota(tokens, admin, other, total=1000, remaining=400)
    again = accepted(purchase(tokens, other, "purchase-test-001"))
    assert wait_for_end(tokens, other, again["sagaId"])["status"] == "COMPLETED"
    assert pool(tokens, other) == (1500, 900)
    assert pool(tokens, user) == (500, 500)
    # bought tokens are credit (never reset), beside the periodic allowance
    balances = quota(tokens, other).json()
    assert (
        balances["allowanceTokens"],
        balances["allowanceRemainingTokens"],
        balances["creditTokens"],
    ) == (1000, 400, 500)


def test_an_org_purchase_fills_the_org_pool(
    tokens: httpx.Client, user: Account, auth: httpx.Client
) -> None:
    created = auth.post(
        "/api/v1/auth/orgs", headers=user.bearer, json={"name": f"org-{uuid.uuid4().hex[:8]}"}
    )
    assert created.status_code == 201, created.text
    org_id = created.json()["orgId"]
    login(auth, user)  # the renewed token carries the membership

    started = accepted(purchase(tokens, user, "org-purchase", amount=700, orgId=org_id))
    saga = wait_for_end(tokens, user, started["sagaId"])
    assert saga["status"] == "COMPLETED"
    assert saga["orgId"] == org_id
    org_pool = tokens.get(
        "/api/v1/tokens/quota/org",
        params={"orgId": org_id, "provider": "openai"},
        headers=user.bearer,
    )
    assert org_pool.status_code == 200, org_pool.text
    assert (org_pool.json()["totalTokens"], org_pool.json()["remainingTokens"]) == (700, 700)
    assert_error(quota(tokens, user), 404, "QUOTA_NOT_FOUND")

    outsider = register(auth)
    denied = purchase(tokens, outsider, "org-purchase", amount=700, orgId=org_id)
    assert_error(denied, 403, "FORBIDDEN")


# §5.2


def test_scenario_5_2_idempotency_key_reuse(
    tokens: httpx.Client, user: Account, auth: httpx.Client
) -> None:
    first = accepted(purchase(tokens, user, "purchase-test-001"))
    assert wait_for_end(tokens, user, first["sagaId"])["status"] == "COMPLETED"

    replay = accepted(purchase(tokens, user, "purchase-test-001"))
    assert replay["sagaId"] == first["sagaId"]
    assert replay["status"] == "COMPLETED"
    assert replay["createdAt"] == first["createdAt"]

    # the key is trimmed: surrounding spaces name the same saga
    padded = accepted(purchase_with_raw_key(tokens, user, "  purchase-test-001 \t "))
    assert padded["sagaId"] == first["sagaId"]
    assert get_saga(tokens, user, "purchase-test-001").json()["id"] == first["sagaId"]

    for changed in ({"provider": "gemini"}, {"amount": 501}):
        conflict = purchase(tokens, user, "purchase-test-001", **changed)
        body = assert_error(conflict, 409, "IDEMPOTENCY_CONFLICT")
        assert "Idempotency-Key" in body["message"]

    # the replays and conflicts bought nothing more
    assert pool(tokens, user) == (500, 500)
    assert_error(quota(tokens, user, "gemini"), 404, "QUOTA_NOT_FOUND")
    assert trail(tokens, user, first["sagaId"]) == SUCCESS_TRAIL

    # keys belong to their user: another user's same key is their own, new purchase
    other = register(auth)
    theirs = accepted(purchase(tokens, other, "purchase-test-001", provider="gemini"))
    assert theirs["sagaId"] != first["sagaId"]
    assert theirs["status"] == "STARTED"
    saga = wait_for_end(tokens, other, "purchase-test-001")
    assert (saga["id"], saga["userId"], saga["provider"]) == (
        theirs["sagaId"],
        other.user_id,
        "gemini",
    )
    assert pool(tokens, other, "gemini") == (500, 500)
    assert pool(tokens, user) == (500, 500)
    assert get_saga(tokens, user, "purchase-test-001").json()["id"] == first["sagaId"]

    # without a key there is no dedup: two purchases, two sagas
    one = accepted(purchase(tokens, user, None, amount=10))
    two = accepted(purchase(tokens, user, None, amount=10))
    assert one["sagaId"] != two["sagaId"]
    for started in (one, two):
        saga = wait_for_end(tokens, user, started["sagaId"])
        assert saga["status"] == "COMPLETED"
        assert saga["idempotencyKey"] is None
    assert pool(tokens, user) == (520, 520)


# §5.3


def test_scenario_5_3_saga_failure_and_compensation(
    tokens: httpx.Client, admin: Account, user: Account
) -> None:
    set_quota(tokens, admin, user, total=1000, remaining=1000)

    set_flag(tokens, admin, "saga.simulate-failure", True)
    try:
        flags = tokens.get("/api/v1/tokens/admin/flags", headers=admin.bearer)
        assert flags.status_code == 200, flags.text
        assert flags.json()["flags"]["saga.simulate-failure"] is True

        started = accepted(purchase(tokens, user, "purchase-fail-001", amount=1000))
        assert started["status"] == "STARTED"
        saga = wait_for_end(tokens, user, "purchase-fail-001")
    finally:
        set_flag(tokens, admin, "saga.simulate-failure", False)

    assert saga["id"] == started["sagaId"]
    assert saga["status"] == "FAILED"
    assert saga["idempotencyKey"] == "purchase-fail-001"
    assert "simulate" in saga["failureReason"]
    assert pool(tokens, user) == (1000, 1000)
    events = trail(tokens, user, "purchase-fail-001")
    assert events == FAILURE_TRAIL
    assert trail(tokens, user, started["sagaId"]) == events

    # the failed saga keeps its key: a replay answers the same, FAILED saga
    replay = accepted(purchase(tokens, user, "purchase-fail-001", amount=1000))
    assert (replay["sagaId"], replay["status"]) == (started["sagaId"], "FAILED")

    # switched off (no restart), the next purchase completes
    next_one = accepted(purchase(tokens, user, "purchase-after-fail-001", amount=1000))
    assert wait_for_end(tokens, user, next_one["sagaId"])["status"] == "COMPLETED"
    assert pool(tokens, user) == (2000, 2000)
    assert trail(tokens, user, next_one["sagaId"]) == SUCCESS_TRAIL


def test_a_declined_payment_fails_the_purchase_with_nothing_to_undo(
    tokens: httpx.Client, admin: Account, user: Account
) -> None:
    set_flag(tokens, admin, "payment.decline", True)
    try:
        started = accepted(purchase(tokens, user, "declined"))
        saga = wait_for_end(tokens, user, "declined")
    finally:
        set_flag(tokens, admin, "payment.decline", False)
    assert (saga["id"], saga["status"]) == (started["sagaId"], "FAILED")
    assert saga["failureReason"] == "payment declined"
    assert trail(tokens, user, "declined") == [
        ("PurchaseStarted", "STARTED"),
        ("PurchaseCompensating", "COMPENSATING"),
        ("PurchaseFailed", "FAILED"),
    ]
    assert_error(quota(tokens, user), 404, "QUOTA_NOT_FOUND")


def test_a_payment_outage_is_retried_and_then_given_up(
    tokens: httpx.Client, admin: Account, user: Account
) -> None:
    set_flag(tokens, admin, "payment.unavailable", True)
    try:
        survives = accepted(purchase(tokens, user, "outage-short"))
        time.sleep(10 * RETRY_BASE)  # a few attempts fail meanwhile, none moves the saga
        assert get_saga(tokens, user, "outage-short").json()["status"] == "STARTED"
    finally:
        set_flag(tokens, admin, "payment.unavailable", False)
    # the outage ended before the attempts ran out: the purchase goes through, as if nothing
    saga = wait_for_end(tokens, user, survives["sagaId"])
    assert saga["status"] == "COMPLETED"
    assert trail(tokens, user, "outage-short") == SUCCESS_TRAIL
    assert pool(tokens, user) == (500, 500)

    set_flag(tokens, admin, "payment.unavailable", True)
    try:
        started = accepted(purchase(tokens, user, "outage-long"))
        saga = wait_for_end(tokens, user, "outage-long")
    finally:
        set_flag(tokens, admin, "payment.unavailable", False)
    assert (saga["id"], saga["status"]) == (started["sagaId"], "FAILED")
    assert saga["failureReason"].startswith("gave up after 5 attempts")
    assert trail(tokens, user, "outage-long") == [
        ("PurchaseStarted", "STARTED"),
        ("PurchaseCompensating", "COMPENSATING"),
        ("PurchaseFailed", "FAILED"),
    ]
    assert pool(tokens, user) == (500, 500)


def test_scenario_5_3_purchases_switched_off_answer_503_not_500(
    tokens: httpx.Client, admin: Account, user: Account
) -> None:
    set_flag(tokens, admin, "saga.purchases-enabled", False)
    try:
        refused = purchase(tokens, user, "while-disabled")
        body = assert_error(refused, 503, "PURCHASES_DISABLED")
        assert "saga.purchases-enabled" in body["message"]
    finally:
        set_flag(tokens, admin, "saga.purchases-enabled", True)
    assert_error(get_saga(tokens, user, "while-disabled"), 404, "SAGA_NOT_FOUND")
    assert_error(quota(tokens, user), 404, "QUOTA_NOT_FOUND")

    started = accepted(purchase(tokens, user, "while-disabled"))
    assert wait_for_end(tokens, user, started["sagaId"])["status"] == "COMPLETED"
    assert pool(tokens, user) == (500, 500)


def test_scenario_5_3_only_an_admin_reads_or_changes_flags(
    tokens: httpx.Client, admin: Account, user: Account
) -> None:
    assert_error(tokens.get("/api/v1/tokens/admin/flags", headers=user.bearer), 403, "FORBIDDEN")
    for name in ("saga.simulate-failure", "saga.purchases-enabled"):
        denied = tokens.put(
            f"/api/v1/tokens/admin/flags/{name}", headers=user.bearer, json={"enabled": False}
        )
        assert_error(denied, 403, "FORBIDDEN")
    assert_error(tokens.get("/api/v1/tokens/admin/flags"), 401, "AUTH_INVALID_KEY")

    flags = tokens.get("/api/v1/tokens/admin/flags", headers=admin.bearer)
    assert flags.status_code == 200, flags.text
    assert flags.json()["flags"] == {
        "saga.purchases-enabled": True,
        "saga.simulate-failure": False,
        "payment.decline": False,
        "payment.unavailable": False,
    }
    unknown = tokens.put(
        "/api/v1/tokens/admin/flags/saga.no-such-flag", headers=admin.bearer, json={"enabled": True}
    )
    assert_error(unknown, 404, "FLAG_NOT_FOUND")
    for bad in ({}, {"enabled": "yes please"}, {"enabled": True, "extra": 1}):
        response = tokens.put(
            "/api/v1/tokens/admin/flags/saga.simulate-failure", headers=admin.bearer, json=bad
        )
        assert_error(response, 400, "INVALID_REQUEST")
    after = tokens.get("/api/v1/tokens/admin/flags", headers=admin.bearer).json()["flags"]
    assert after == flags.json()["flags"]


# §8.1 step 4, and the rest of a purchase's validation


def test_scenario_8_1_step_4_oversized_idempotency_key(tokens: httpx.Client, user: Account) -> None:
    too_long = purchase(tokens, user, "x" * 150, amount=100)
    body = assert_error(too_long, 400, "INVALID_REQUEST")
    assert "Idempotency-Key" in body["message"]
    assert detail_fields(body) == {"Idempotency-Key"}

    # what counts is the trimmed key: 100 characters fit, with spaces around them too
    longest = accepted(purchase_with_raw_key(tokens, user, f"  {'k' * 100}  ", amount=100))
    saga = wait_for_end(tokens, user, longest["sagaId"])
    assert saga["idempotencyKey"] == "k" * 100
    assert_error(purchase(tokens, user, "k" * 101, amount=100), 400, "INVALID_REQUEST")
    # no saga can have such a key; looking one up is simply not found
    assert_error(get_saga(tokens, user, "x" * 150), 404, "SAGA_NOT_FOUND")
    assert pool(tokens, user) == (100, 100)


def test_scenario_8_1_step_4_purchase_payloads_are_validated(
    tokens: httpx.Client, user: Account, auth: httpx.Client
) -> None:
    bad_tokens = (0, -1, "5", 1.5, None, True, MAX_PURCHASE + 1, 10**20)
    for amount in bad_tokens:
        response = purchase(tokens, user, f"bad-{uuid.uuid4().hex}", amount=amount)
        assert detail_fields(assert_error(response, 400, "INVALID_REQUEST")) == {"tokens"}, amount

    unknown_provider = purchase(tokens, user, "bad-provider", provider="nosuchai")
    assert "provider" in detail_fields(assert_error(unknown_provider, 400, "INVALID_REQUEST"))

    bad_user = tokens.post(
        "/api/v1/tokens/purchase",
        headers={**user.bearer, "Idempotency-Key": "bad-user"},
        json={"userId": "not-a-uuid", "provider": "openai", "tokens": 500},
    )
    assert "userId" in detail_fields(assert_error(bad_user, 400, "INVALID_REQUEST"))
    missing_user = tokens.post(
        "/api/v1/tokens/purchase",
        headers={**user.bearer, "Idempotency-Key": "missing-user"},
        json={"provider": "openai", "tokens": 500},
    )
    assert "userId" in detail_fields(assert_error(missing_user, 400, "INVALID_REQUEST"))
    unknown_field = purchase(tokens, user, "unknown-field", price=1)
    assert "price" in detail_fields(assert_error(unknown_field, 400, "INVALID_REQUEST"))
    blank_key = purchase_with_raw_key(tokens, user, "   ")
    assert detail_fields(assert_error(blank_key, 400, "INVALID_REQUEST")) == {"Idempotency-Key"}

    # buying for someone else is forbidden; nobody may buy anonymously
    other = register(auth)
    for_other = purchase(tokens, user, "for-other", userId=other.user_id)
    assert_error(for_other, 403, "FORBIDDEN")
    anonymous = tokens.post(
        "/api/v1/tokens/purchase",
        headers={"Idempotency-Key": "anonymous"},
        json={"userId": user.user_id, "provider": "openai", "tokens": 500},
    )
    assert_error(anonymous, 401, "AUTH_INVALID_KEY")

    # nothing was started, nothing was bought
    listed = tokens.get("/api/v1/tokens/purchases", headers=user.bearer).json()
    assert listed["pagination"]["total"] == 0
    assert_error(quota(tokens, user), 404, "QUOTA_NOT_FOUND")
    assert_error(quota(tokens, other), 404, "QUOTA_NOT_FOUND")


def test_scenario_8_1_step_4_another_users_saga_is_not_found(
    tokens: httpx.Client, admin: Account, user: Account, auth: httpx.Client
) -> None:
    started = accepted(purchase(tokens, user, "private-purchase"))
    wait_for_end(tokens, user, started["sagaId"])

    other = register(auth)
    for reference in (started["sagaId"], "private-purchase", str(uuid.uuid4())):
        assert_error(get_saga(tokens, other, reference), 404, "SAGA_NOT_FOUND")
        events = tokens.get(f"/api/v1/tokens/purchase/{reference}/events", headers=other.bearer)
        assert_error(events, 404, "SAGA_NOT_FOUND")
    listed = tokens.get("/api/v1/tokens/purchases", headers=other.bearer).json()
    assert listed["items"] == []

    # an ADMIN reads it by id (keys are per user, so not by the user's key)
    as_admin = get_saga(tokens, admin, started["sagaId"])
    assert as_admin.status_code == 200, as_admin.text
    assert as_admin.json()["userId"] == user.user_id
    assert_error(get_saga(tokens, admin, "private-purchase"), 404, "SAGA_NOT_FOUND")


# §9.2 concurrency


async def _purchase_concurrently(
    base_url: str, account: Account, keys: list[str], amounts: list[int]
) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(keys), max_keepalive_connections=len(keys))
    async with httpx.AsyncClient(base_url=base_url, timeout=60.0, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post(
                    "/api/v1/tokens/purchase",
                    headers={**account.bearer, "Idempotency-Key": key},
                    json={"userId": account.user_id, "provider": "openai", "tokens": amount},
                )
                for key, amount in zip(keys, amounts, strict=True)
            )
        )


def test_scenario_9_2_saga_load_test(
    system: Stack, tokens: httpx.Client, admin: Account, user: Account
) -> None:
    set_quota(tokens, admin, user, total=1000, remaining=1000)
    keys = [f"load-test-{i}" for i in range(1, 21)]
    amounts = [100 + i for i in range(20)]  # distinct, so a lost or doubled one shows in the sum

    started = time.monotonic()
    responses = asyncio.run(_purchase_concurrently(system.url("tokens"), user, keys, amounts))
    saga_ids = [accepted(r)["sagaId"] for r in responses]
    assert len(set(saga_ids)) == 20

    # as the plan does: find each saga again by replaying its key, then read its status
    for key, amount, saga_id in zip(keys, amounts, saga_ids, strict=True):
        assert accepted(purchase(tokens, user, key, amount=amount))["sagaId"] == saga_id
        saga = wait_for_end(tokens, user, saga_id, timeout=30.0)
        assert (saga["status"], saga["tokens"], saga["idempotencyKey"]) == (
            "COMPLETED",
            amount,
            key,
        )
        assert trail(tokens, user, saga_id) == SUCCESS_TRAIL
    elapsed = time.monotonic() - started

    assert pool(tokens, user) == (1000 + sum(amounts), 1000 + sum(amounts))
    listed = tokens.get(
        "/api/v1/tokens/purchases", headers=user.bearer, params={"page_size": 100}
    ).json()
    assert listed["pagination"]["total"] == 20
    assert {item["id"] for item in listed["items"]} == set(saga_ids)
    assert elapsed < 30.0


def test_scenario_9_2_concurrent_purchases_with_one_key(
    system: Stack, tokens: httpx.Client, user: Account
) -> None:
    responses = asyncio.run(
        _purchase_concurrently(system.url("tokens"), user, ["one-key"] * 20, [250] * 20)
    )
    saga_ids = {accepted(r)["sagaId"] for r in responses}
    assert len(saga_ids) == 1
    (saga_id,) = saga_ids

    assert wait_for_end(tokens, user, saga_id)["status"] == "COMPLETED"
    assert pool(tokens, user) == (250, 250)
    assert trail(tokens, user, saga_id) == SUCCESS_TRAIL
    listed = tokens.get("/api/v1/tokens/purchases", headers=user.bearer).json()
    assert [item["id"] for item in listed["items"]] == [saga_id]
