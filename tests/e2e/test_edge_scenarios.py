"""Issue 9, defect 6, against the real system (`leaky-tokens up`, both shapes): with purchases
switched off, one user's PURCHASES_DISABLED answers through the gateway opened the token
service's breaker and cut every other user off for 30 s. A business 503 is about one caller's
request; only the token service's own outages (marked X-Service-Outage) count."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Stack
from tests.e2e.journeys import ADMIN_PASSWORD, Account, admin_env, login, register

pytestmark = pytest.mark.e2e

ADMIN_USERNAME = "e2e_edge_admin"


@pytest.fixture(scope="module")
def system(stack_env: tuple[Path, dict[str, str], str]) -> Iterator[Stack]:
    workdir, env, shape = stack_env
    running = Stack(workdir, env, shape)
    running.up(
        extra_env={
            **admin_env(ADMIN_USERNAME),
            # A breaker that counted business 503s would open after 3 of them.
            "LEAKY_GATEWAY__BREAKER_WINDOW_SIZE": "4",
            "LEAKY_GATEWAY__BREAKER_MINIMUM_CALLS": "3",
        }
    )
    try:
        yield running
    finally:
        running.stop_all()


@pytest.fixture(scope="module")
def gateway(system: Stack) -> Iterator[httpx.Client]:
    with system.client("gateway") as client:
        yield client


def set_purchases(gateway: httpx.Client, admin: Account, enabled: bool) -> None:
    response = gateway.put(
        "/api/v1/tokens/admin/flags/saga.purchases-enabled",
        headers=admin.bearer,
        json={"enabled": enabled},
    )
    assert response.status_code == 200, response.text


def test_one_users_business_503s_leave_every_other_user_alone(
    system: Stack, gateway: httpx.Client
) -> None:
    with system.client("auth") as auth:
        admin = login(auth, Account("", ADMIN_USERNAME, ADMIN_PASSWORD, ""))
        buyer, other = register(auth, "buyer"), register(auth, "other")
    set_purchases(gateway, admin, False)
    try:
        refused = [
            gateway.post(
                "/api/v1/tokens/purchase",
                headers={**buyer.bearer, "Idempotency-Key": f"off-{i}"},
                json={"userId": buyer.user_id, "provider": "openai", "tokens": 100},
            )
            for i in range(12)
        ]
        others = [
            gateway.get(
                "/api/v1/tokens/quota",
                params={"userId": other.user_id, "provider": "openai"},
                headers=other.bearer,
            )
            for _ in range(3)
        ]
        health = gateway.get("/health")
    finally:
        set_purchases(gateway, admin, True)

    for response in refused:
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "PURCHASES_DISABLED"
        assert "x-service-outage" not in response.headers
    for response in others:
        # the other user's own answer (no pool yet), never the gateway's "Circuit breaker open"
        assert response.status_code == 404, response.text
        assert response.json()["code"] == "QUOTA_NOT_FOUND"
    breaker = health.json()["circuitBreakers"]["tokens"]
    assert breaker["state"] == "closed"
    assert breaker["failedCallsInWindow"] == 0


def test_a_trailing_slash_redirect_names_no_internal_address(
    system: Stack, gateway: httpx.Client
) -> None:
    with system.client("auth") as auth:
        user = register(auth, "slash")
    response = gateway.get(
        "/api/v1/tokens/quota/",
        params={"userId": user.user_id, "provider": "openai"},
        headers=user.bearer,
        follow_redirects=False,
    )

    # The gateway refuses an empty path segment itself (404), or passes the service's redirect
    # on with its Location made a path on the gateway.
    assert response.status_code in (307, 404), response.text
    if response.is_redirect:
        location = response.headers["location"]
        assert location.startswith("/api/v1/tokens/quota"), location
    internal = f":{system.url('tokens').rsplit(':', 1)[1]}"
    assert internal not in response.text
    assert all(internal not in value for value in response.headers.values())


def test_an_unknown_transfer_coding_never_reaches_the_upstream(
    system: Stack, gateway: httpx.Client
) -> None:
    """Defect 7: `Transfer-Encoding: xchunked` got a 400 while the DELETE still revoked the key."""
    import socket

    with system.client("auth") as auth:
        user = register(auth, "coding")
        created = auth.post(
            "/api/v1/auth/api-keys",
            headers=user.bearer,
            json={"userId": user.user_id, "name": "kept"},
        )
        assert created.status_code == 201, created.text
        key = created.json()
    port = int(system.url("gateway").rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.sendall(
            (
                f"DELETE /api/v1/auth/api-keys/{key['id']} HTTP/1.1\r\n"
                "Host: gateway\r\n"
                f"Authorization: Bearer {user.token}\r\n"
                "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"
            ).encode()
        )
        status_line = raw.recv(65536).split(b"\r\n", 1)[0]

    assert status_line.split()[1] in (b"400", b"501"), status_line
    with system.client("auth") as auth:
        still = auth.get("/api/v1/auth/api-keys/validate", headers={"X-Api-Key": key["rawKey"]})
    assert still.status_code == 200, still.text
