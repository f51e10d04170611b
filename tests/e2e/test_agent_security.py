"""TS-5: the agent API's guards, in both shapes: no credential, a wrong, malformed or revoked
key, an expired or forged Bearer token -> 401 in the envelope; one agent never reaches
another's session (404 SESSION_NOT_FOUND) or order; a session's credential spends only, and
dies within a second of the session's end, at the gateway and at the token service."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.e2e.agent_api import (
    Agent,
    agent_stack,
    consume_through,
    eventually,
    failed,
    ok,
    open_session,
    recharge,
    register,
)
from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e

PROTECTED: tuple[tuple[str, str], ...] = (
    ("GET", "/v1/account/info"),
    ("GET", "/v1/products"),
    ("GET", "/v1/billing/balance"),
    ("POST", "/v1/billing/recharge"),
    ("GET", f"/v1/billing/recharge/{uuid.uuid4()}/status"),
    ("POST", "/v1/sessions"),
    ("GET", "/v1/sessions"),
    ("GET", f"/v1/sessions/{uuid.uuid4()}"),
    ("POST", f"/v1/sessions/{uuid.uuid4()}/report-event"),
    ("GET", f"/v1/sessions/{uuid.uuid4()}/health"),
    ("POST", f"/v1/sessions/{uuid.uuid4()}/rotate"),
    ("POST", f"/v1/sessions/{uuid.uuid4()}/terminate"),
    ("GET", "/v1/stats/overview"),
)
JWT_TTL_SECONDS = 30  # the least the settings allow: the expired-token case waits for it


@pytest.fixture(scope="module")
def system(stack_env: tuple[Path, dict[str, str], str]) -> Iterator[Stack]:
    extra = {"LEAKY_AUTH__JWT_TTL_SECONDS": str(JWT_TTL_SECONDS)}
    with agent_stack(stack_env, extra) as running:
        yield running


@pytest.fixture(scope="module")
def gateway(system: Stack) -> Iterator[httpx.Client]:
    with system.client("gateway") as client:
        yield client


@pytest.fixture(scope="module")
def early_token(gateway: httpx.Client) -> str:
    """A Bearer token issued when the module starts, so it has expired by the time it is
    checked (the test waits for that, at most the token's lifetime)."""
    agent = register(gateway)
    data = ok(
        gateway.post(
            "/v1/auth/token", json={"api_key": agent.api_key, "api_secret": agent.api_secret}
        )
    )
    return str(data["access_token"])


def _each_protected(gateway: httpx.Client, headers: dict[str, str]) -> list[httpx.Response]:
    return [gateway.request(method, path, headers=headers) for method, path in PROTECTED]


def test_no_credential_is_401_auth_invalid_key_on_every_protected_endpoint(
    gateway: httpx.Client,
) -> None:
    for response in _each_protected(gateway, {}):
        failed(response, 401, "AUTH_INVALID_KEY")


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": f"leaky_{uuid.uuid4()}_{'0' * 48}"},  # well formed, unknown
        {"X-API-Key": "not-a-key"},  # malformed
        {"X-API-Key": ""},  # empty
        {"Authorization": "Bearer not.a.jwt"},  # malformed Bearer
        {"Authorization": "Basic dXNlcjpwYXNz"},  # not Bearer at all
    ],
    ids=["unknown-key", "malformed-key", "empty-key", "malformed-bearer", "basic-auth"],
)
def test_a_wrong_or_malformed_credential_is_401(
    gateway: httpx.Client, headers: dict[str, str]
) -> None:
    for response in _each_protected(gateway, headers):
        failed(response, 401, "AUTH_INVALID_KEY")


def test_a_revoked_key_is_401(gateway: httpx.Client) -> None:
    agent = register(gateway)
    info = ok(gateway.get("/v1/account/info", headers=agent.key))
    token = ok(
        gateway.post(
            "/v1/auth/token", json={"api_key": agent.api_key, "api_secret": agent.api_secret}
        )
    )["access_token"]
    listing = gateway.get("/api/v1/auth/api-keys", headers={"Authorization": f"Bearer {token}"})
    key_id = listing.json()["items"][0]["id"]
    revoked = gateway.delete(
        f"/api/v1/auth/api-keys/{key_id}", headers={"Authorization": f"Bearer {token}"}
    )
    assert revoked.status_code == 204, revoked.text
    assert info["agent_id"] == agent.agent_id
    eventually(
        lambda: gateway.get("/v1/account/info", headers=agent.key).status_code == 401,
        within=10,
        what="revoked key refused",
    )
    failed(gateway.get("/v1/account/info", headers=agent.key), 401, "AUTH_INVALID_KEY")


def test_a_forged_bearer_token_is_401(gateway: httpx.Client) -> None:
    agent = register(gateway)
    real = ok(
        gateway.post(
            "/v1/auth/token", json={"api_key": agent.api_key, "api_secret": agent.api_secret}
        )
    )["access_token"]
    kid = jwt.get_unverified_header(real)["kid"]
    claims = jwt.decode(real, options={"verify_signature": False})
    foreign = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(
        {**claims, "roles": ["USER", "ADMIN"]}, foreign, algorithm="RS256", headers={"kid": kid}
    )
    for response in _each_protected(gateway, {"Authorization": f"Bearer {forged}"}):
        failed(response, 401, "AUTH_INVALID_KEY")


def test_an_expired_bearer_token_is_401_auth_expired_token(
    gateway: httpx.Client, early_token: str
) -> None:
    headers = {"Authorization": f"Bearer {early_token}"}
    expiry = jwt.decode(early_token, options={"verify_signature": False})["exp"]
    # Wait (without asking) until the token is past its expiry and the verifiers' 5 s leeway
    # for clock skew, then ask.
    time.sleep(max(0.0, expiry - time.time() + 6.5))
    for response in _each_protected(gateway, headers):
        failed(response, 401, "AUTH_EXPIRED_TOKEN")


def test_wrong_api_secret_gets_no_token(gateway: httpx.Client) -> None:
    agent = register(gateway)
    failed(
        gateway.post("/v1/auth/token", json={"api_key": agent.api_key, "api_secret": "nope"}),
        401,
        "AUTH_INVALID_KEY",
    )
    other = register(gateway)
    failed(
        gateway.post(
            "/v1/auth/token", json={"api_key": agent.api_key, "api_secret": other.api_secret}
        ),
        401,
        "AUTH_INVALID_KEY",
    )


def _funded_session(gateway: httpx.Client, budget: int = 500) -> tuple[Agent, dict[str, object]]:
    agent = register(gateway)
    recharge(gateway, agent, 1000)
    return agent, open_session(gateway, agent, budget)


def test_agent_b_cannot_read_rotate_report_on_or_terminate_agent_a_s_session(
    gateway: httpx.Client,
) -> None:
    alice, session = _funded_session(gateway)
    bob = register(gateway, "bob")
    sid = session["session_id"]
    attempts = [
        gateway.get(f"/v1/sessions/{sid}", headers=bob.key),
        gateway.get(f"/v1/sessions/{sid}/health", headers=bob.key),
        gateway.post(f"/v1/sessions/{sid}/rotate", headers=bob.key, json={"reason": "mine now"}),
        gateway.post(
            f"/v1/sessions/{sid}/report-event",
            headers=bob.key,
            json={"type": "http_error", "status_code": 500},
        ),
        gateway.post(f"/v1/sessions/{sid}/terminate", headers=bob.key),
    ]
    for response in attempts:
        failed(response, 404, "SESSION_NOT_FOUND")
    listed = ok(gateway.get("/v1/sessions", headers=bob.key))
    assert listed["items"] == []

    # Alice's session is as it was: active, same credential, no events, not rotated.
    mine = ok(gateway.get(f"/v1/sessions/{sid}", headers=alice.key))
    assert mine["status"] == "active"
    assert mine["rotations"] == 0
    assert mine["proxy"] == session["proxy"]
    health = ok(gateway.get(f"/v1/sessions/{sid}/health", headers=alice.key))
    assert health["events_considered"] == 0


def test_agent_b_cannot_read_agent_a_s_recharge_order(gateway: httpx.Client) -> None:
    alice = register(gateway)
    order_id = recharge(gateway, alice, 100)
    bob = register(gateway, "bob")
    failed(
        gateway.get(f"/v1/billing/recharge/{order_id}/status", headers=bob.key),
        404,
        "ORDER_NOT_FOUND",
    )


def test_a_session_credential_spends_only_and_cannot_manage(gateway: httpx.Client) -> None:
    agent, session = _funded_session(gateway)
    proxy = session["proxy"]
    assert isinstance(proxy, dict)
    credential = {"X-API-Key": proxy["api_key"]}
    for method, path in (
        ("GET", "/v1/account/info"),
        ("GET", "/v1/sessions"),
        ("GET", f"/v1/sessions/{session['session_id']}"),
        ("POST", f"/v1/sessions/{session['session_id']}/terminate"),
    ):
        failed(gateway.request(method, path, headers=credential), 403, "FORBIDDEN")
    # Nor be exchanged for a Bearer token (with the account's own secret).
    exchanged = gateway.post(
        "/v1/auth/token", json={"api_key": proxy["api_key"], "api_secret": agent.api_secret}
    )
    failed(exchanged, 403, "FORBIDDEN")
    # It cannot mint keys at the auth service, nor buy tokens, either.
    minted = gateway.post("/api/v1/auth/api-keys", headers=credential, json={"name": "escape"})
    assert minted.status_code == 403, minted.text
    bought = gateway.post(
        "/api/v1/tokens/purchase",
        headers={**credential, "Idempotency-Key": uuid.uuid4().hex},
        json={"userId": agent.agent_id, "provider": "openai", "tokens": 10},
    )
    assert bought.status_code == 403, bought.text
    # Nor read its user's account through the plan API: quotas, usage, keys.
    for path in (
        f"/api/v1/tokens/quota?userId={agent.agent_id}&provider=openai",
        "/api/v1/tokens/quotas",
        f"/api/v1/analytics/usage?userId={agent.agent_id}&provider=openai",
        "/api/v1/auth/api-keys",
    ):
        read = gateway.get(path, headers=credential)
        assert read.status_code == 403, (path, read.text)
    assert ok(gateway.get(f"/v1/sessions/{session['session_id']}", headers=agent.key))[
        "status"
    ] == ("active")


def test_a_terminated_session_s_credential_fails_everywhere_within_a_second(
    gateway: httpx.Client, system: Stack
) -> None:
    agent, session = _funded_session(gateway)
    proxy = session["proxy"]
    assert isinstance(proxy, dict)
    credential = str(proxy["api_key"])
    path = f"/api/v1/tokens/quota?userId={agent.agent_id}&provider=openai"
    headers = {"X-Api-Key": credential}
    with system.client("tokens") as tokens:
        # Both now hold the credential's validation in their caches.
        assert consume_through(gateway, agent, credential, 5).status_code == 200
        assert tokens.get(path, headers=headers).status_code == 200

        ok(gateway.post(f"/v1/sessions/{session['session_id']}/terminate", headers=agent.key))
        ended_at = time.monotonic()
        refused: dict[str, float] = {}
        while len(refused) < 2 and time.monotonic() - ended_at < 5:
            for name, client in (("gateway", gateway), ("tokens", tokens)):
                if name not in refused and client.get(path, headers=headers).status_code == 401:
                    refused[name] = time.monotonic() - ended_at
            time.sleep(0.02)

    assert set(refused) == {"gateway", "tokens"}, refused
    assert max(refused.values()) < 1.0, refused


def test_registration_conflicts_throttle_only_the_address_that_made_them(
    gateway: httpx.Client,
) -> None:
    # The agent API registers through auth on the caller's behalf and forwards the caller's
    # address, so one prober's conflicts do not shut registration for every other agent.
    taken = register(gateway, "taken")
    # Addresses of this run only: the distributed shape's windows outlive a run in Redis.
    octets = uuid.uuid4().bytes
    prober = {"x-forwarded-for": f"10.{octets[0]}.{octets[1]}.{octets[2]}"}
    answers = [
        gateway.post("/v1/account/register", json={"name": taken.name}, headers=prober)
        for _ in range(12)
    ]
    assert answers[0].status_code == 400, answers[0].text
    assert answers[-1].status_code == 429, answers[-1].text
    assert answers[-1].json()["success"] is False
    other = gateway.post(
        "/v1/account/register",
        json={"name": f"other_{uuid.uuid4().hex[:10]}"},
        headers={"x-forwarded-for": f"10.{octets[3]}.{octets[4]}.{octets[5]}"},
    )
    assert other.status_code == 201, other.text
