"""Plan §3.1, §8.2 and the "Gateway Access" appendix through the gateway, with real processes.

The token service runs apart (`up --skip tokens` + `serve tokens`, every port fixed in
advance) so §8.2 can really stop and restart it. The gateway's breaker is small and quick here
(open after 3 of 3 failures, 2 s open wait, one probe), and services trust a validated API key
for a whole minute: a revoked key that stops working within a second shows the revocation
event at work, not a cache expiring. Further gateway processes are started beside the first for
the short-window recovery of §3.1 and, on Redis, for two replicas sharing one limit.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.e2e.conftest import SERVICES, Process, Stack, free_ports
from tests.e2e.journeys import Account, login, register

pytestmark = pytest.mark.e2e

ADMIN_USERNAME = "e2e_gateway_admin"
ADMIN_PASSWORD = "admin-password-123"
ERROR_FIELDS = {"message", "timestamp", "code", "requestId"}
FALLBACK_FIELDS = {"service", "status", "message", "timestamp"}
LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
OPEN_SECONDS = 2
SHORT_WINDOW = 3
SHORT_LIMIT = 10


@dataclass
class GatewayStack:
    stack: Stack
    workdir: Path
    env: dict[str, str]  # what every process of the stack shares
    shape: str
    ports: dict[str, int]
    tokens: Process
    extra_gateways: dict[str, Process] = field(default_factory=dict)

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def client(self, service: str = "gateway") -> httpx.Client:
        return httpx.Client(base_url=self.url(service), timeout=30.0)

    def stop_tokens(self) -> None:
        self.tokens.kill()

    def start_tokens(self) -> None:
        self.tokens = self._serve("tokens", self.ports["tokens"], f"tokens-{uuid.uuid4().hex[:6]}")

    def gateway(self, name: str, **settings: str) -> httpx.Client:
        """Another gateway process (same upstreams) with these settings; its client."""
        if name not in self.extra_gateways:
            self.extra_gateways[name] = self._serve("gateway", 0, name, settings)
        port = self.extra_gateways[name].ports["gateway"]
        return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0)

    def _serve(
        self, service: str, port: int, name: str, settings: dict[str, str] | None = None
    ) -> Process:
        env = {**self.env, **(settings or {})}
        process = Process(["serve", service, "--port", str(port)], env, self.workdir, name)
        self.stack.processes.append(process.start())
        return process


@pytest.fixture(scope="module")
def gw_stack(stack_env: tuple[Path, dict[str, str], str]) -> Iterator[GatewayStack]:
    workdir, base, shape = stack_env
    ports = dict(zip(SERVICES, free_ports(len(SERVICES)), strict=True))
    env = {
        **base,
        **{f"LEAKY_PORTS__{s.upper()}": str(p) for s, p in ports.items()},
        "LEAKY_ADMIN_USERNAME": ADMIN_USERNAME,
        "LEAKY_ADMIN_PASSWORD": ADMIN_PASSWORD,
        # Redis is shared by every test module: this module's windows are its own.
        "LEAKY_GATEWAY__RATE_LIMIT_KEY_PREFIX": f"lt:gw:e2e:{uuid.uuid4().hex}:",
        "LEAKY_GATEWAY__BREAKER_WINDOW_SIZE": "3",
        "LEAKY_GATEWAY__BREAKER_MINIMUM_CALLS": "3",
        "LEAKY_GATEWAY__BREAKER_OPEN_SECONDS": str(OPEN_SECONDS),
        "LEAKY_GATEWAY__BREAKER_HALF_OPEN_CALLS": "1",
        "LEAKY_GATEWAY__CONNECT_TIMEOUT_SECONDS": "1",
        "LEAKY_AUTH_CLIENT__API_KEY_CACHE_SECONDS": "60",
    }
    stack = Stack(workdir, env, shape)
    try:
        stack.up("--skip", "tokens", name="gateway-up")
        tokens = Process(["serve", "tokens"], env, workdir, "tokens").start()
        stack.processes.append(tokens)
        yield GatewayStack(stack, workdir, env, shape, ports, tokens)
    finally:
        stack.stop_all()


@pytest.fixture(scope="module")
def gateway(gw_stack: GatewayStack) -> Iterator[httpx.Client]:
    with gw_stack.client() as client:
        yield client


@pytest.fixture(scope="module")
def admin(gateway: httpx.Client) -> Account:
    return login(gateway, Account("", ADMIN_USERNAME, ADMIN_PASSWORD, ""))


def new_key(gateway: httpx.Client) -> tuple[Account, dict[str, str]]:
    """A fresh user (so a fresh rate-limit principal) and an API key, made through the gateway."""
    account = register(gateway, "gw")
    response = gateway.post(
        "/api/v1/auth/api-keys",
        headers=account.bearer,
        json={"userId": account.user_id, "name": "cli-access"},
    )
    assert response.status_code == 201, response.text
    return account, response.json()


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body.keys() >= ERROR_FIELDS, body
    assert body["code"] == code, body
    assert body["requestId"] == response.headers["X-Request-Id"]
    for name in LIMIT_HEADERS:
        assert name in response.headers, name
    return body


# -- §3.1 ----------------------------------------------------------------------------------------


def test_scenario_3_1_gateway_rate_limiting(gateway: httpx.Client) -> None:
    _, key = new_key(gateway)
    headers = {"X-Api-Key": key["rawKey"]}

    # 1. five requests within the limit: 200 with the limit, decreasing remaining, epoch reset
    started = time.time()
    first = [gateway.get("/api/v1/tokens/status", headers=headers) for _ in range(5)]
    assert [r.status_code for r in first] == [200] * 5
    assert [r.headers["X-RateLimit-Limit"] for r in first] == ["120"] * 5
    assert [r.headers["X-RateLimit-Remaining"] for r in first] == [
        "119",
        "118",
        "117",
        "116",
        "115",
    ]
    reset = int(first[0].headers["X-RateLimit-Reset"])
    assert started + 55 <= reset <= time.time() + 61
    assert first[0].headers["RateLimit-Policy"] == '"default";q=120;w=60'
    assert first[0].json()["service"] == "token-service"

    # 2. the headers show the current state
    state = gateway.get("/api/v1/tokens/status", headers=headers)
    assert state.headers["X-RateLimit-Remaining"] == "114"

    # 3. 150 requests more: the rest of the 120 pass, then 429 with Retry-After
    statuses = []
    refused = None
    for _ in range(150):
        response = gateway.get("/api/v1/tokens/status", headers=headers)
        statuses.append(response.status_code)
        if response.status_code == 429:
            refused = response
    assert statuses == [200] * 114 + [429] * 36
    assert refused is not None
    body = assert_error(refused, 429, "RATE_LIMITED")
    assert body["message"] == "rate limit exceeded"
    assert body["retryAfterSeconds"] == int(refused.headers["Retry-After"])
    assert 1 <= body["retryAfterSeconds"] <= 60
    assert refused.headers["X-RateLimit-Remaining"] == "0"


def test_scenario_3_1_recovery_after_the_window(gw_stack: GatewayStack) -> None:
    with gw_stack.client() as via_main:
        _, key = new_key(via_main)
    headers = {"X-Api-Key": key["rawKey"]}
    settings = {
        "LEAKY_GATEWAY__RATE_LIMIT_REQUESTS": str(SHORT_LIMIT),
        "LEAKY_GATEWAY__RATE_LIMIT_WINDOW_SECONDS": str(SHORT_WINDOW),
        "LEAKY_GATEWAY__RATE_LIMIT_KEY_PREFIX": f"lt:gw:e2e:{uuid.uuid4().hex}:",
    }
    with gw_stack.gateway("gateway-short-window", **settings) as gateway:
        statuses = [
            gateway.get("/api/v1/tokens/status", headers=headers).status_code
            for _ in range(SHORT_LIMIT)
        ]
        refused = gateway.get("/api/v1/tokens/status", headers=headers)
        assert statuses == [200] * SHORT_LIMIT
        assert refused.status_code == 429

        # 4. wait for the time Retry-After gives, and the limit is back in full
        time.sleep(int(refused.headers["Retry-After"]) + 0.2)
        again = gateway.get("/api/v1/tokens/status", headers=headers)

    assert again.status_code == 200
    assert again.headers["X-RateLimit-Remaining"] == str(SHORT_LIMIT - 1)
    assert int(again.headers["X-RateLimit-Reset"]) > int(refused.headers["X-RateLimit-Reset"])


def test_two_gateways_on_one_redis_share_one_limit(gw_stack: GatewayStack) -> None:
    if gw_stack.shape != "distributed":
        pytest.skip("without Redis each gateway process keeps its own limits (by design)")
    with gw_stack.client() as first, gw_stack.gateway("gateway-replica") as second:
        _, key = new_key(first)
        headers = {"X-Api-Key": key["rawKey"]}
        statuses = [
            (first if i % 2 else second).get("/api/v1/tokens/status", headers=headers).status_code
            for i in range(240)
        ]

    assert statuses.count(200) == 120
    assert statuses[120:] == [429] * 120


# -- edge authentication and identity ------------------------------------------------------------


def test_credentials_are_checked_at_the_edge(gateway: httpx.Client) -> None:
    assert_error(gateway.get("/api/v1/tokens/quota"), 401, "AUTH_INVALID_KEY")
    assert_error(
        gateway.get("/api/v1/tokens/quota", headers={"X-Api-Key": "invalid_key_value"}),
        401,
        "AUTH_INVALID_KEY",
    )
    assert_error(
        gateway.get("/api/v1/tokens/quota", headers={"Authorization": "Bearer invalid.token.here"}),
        401,
        "AUTH_INVALID_TOKEN",
    )
    assert_error(gateway.get("/api/v1/no/such/route"), 404, "NOT_FOUND")


def test_a_spoofed_identity_header_is_ignored(gateway: httpx.Client, admin: Account) -> None:
    victim = register(gateway, "victim")
    spoof = {"X-User-Id": admin.user_id, "X-Authenticated-User": ADMIN_USERNAME}

    anonymous = gateway.get(
        f"/api/v1/tokens/quota?userId={victim.user_id}&provider=openai", headers=spoof
    )
    assert_error(anonymous, 401, "AUTH_INVALID_KEY")

    # A real user claiming to be the ADMIN is still only themself: another's quota is 403.
    intruder = register(gateway, "intruder")
    response = gateway.get(
        f"/api/v1/tokens/quota?userId={victim.user_id}&provider=openai",
        headers={**intruder.bearer, **spoof},
    )
    assert_error(response, 403, "FORBIDDEN")


def test_a_jwt_signed_by_another_key_is_refused(gateway: httpx.Client) -> None:
    account = register(gateway, "forged")
    kid = jwt.get_unverified_header(account.token)["kid"]
    claims = jwt.decode(account.token, options={"verify_signature": False})
    foreign = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(
        {**claims, "roles": ["USER", "ADMIN"]}, foreign, algorithm="RS256", headers={"kid": kid}
    )

    response = gateway.get(
        f"/api/v1/tokens/quota?userId={account.user_id}&provider=openai",
        headers={"Authorization": f"Bearer {forged}"},
    )

    assert_error(response, 401, "AUTH_INVALID_TOKEN")


def test_a_revoked_key_fails_at_the_gateway_and_the_token_service_within_a_second(
    gw_stack: GatewayStack, gateway: httpx.Client
) -> None:
    account, key = new_key(gateway)
    path = f"/api/v1/tokens/quota?userId={account.user_id}&provider=openai"
    headers = {"X-Api-Key": key["rawKey"]}
    with gw_stack.client("tokens") as tokens:
        # Both now hold the key's validation in their caches (for a minute, in this stack).
        assert gateway.get(path, headers=headers).status_code == 404  # no quota, but let in
        assert tokens.get(path, headers=headers).status_code == 404

        revoked = gateway.delete(f"/api/v1/auth/api-keys/{key['id']}", headers=account.bearer)
        assert revoked.status_code == 204
        revoked_at = time.monotonic()
        refused: dict[str, float] = {}
        while len(refused) < 2 and time.monotonic() - revoked_at < 5:
            for name, client in (("gateway", gateway), ("tokens", tokens)):
                if name not in refused and client.get(path, headers=headers).status_code == 401:
                    refused[name] = time.monotonic() - revoked_at
            time.sleep(0.02)

        assert set(refused) == {"gateway", "tokens"}, refused
        assert max(refused.values()) < 1.0, refused
        assert_error(gateway.get(path, headers=headers), 401, "AUTH_REVOKED_KEY")
        assert tokens.get(path, headers=headers).json()["code"] == "AUTH_REVOKED_KEY"


# -- answers from upstreams pass through -------------------------------------------------------


def test_upstream_answers_pass_through_unchanged(gateway: httpx.Client, admin: Account) -> None:
    account, key = new_key(gateway)
    consume = {"userId": account.user_id, "provider": "openai", "tokens": 10, "prompt": "test"}

    # 402: no quota yet
    no_quota = gateway.post(
        "/api/v1/tokens/consume", headers={"X-Api-Key": key["rawKey"]}, json=consume
    )
    assert no_quota.status_code == 402, no_quota.text
    assert no_quota.json()["code"] == "INSUFFICIENT_QUOTA"

    # 502: the provider fails (its fault switch, ADMIN-only at the gateway)
    set_quota = gateway.put(
        "/api/v1/tokens/quota",
        headers=admin.bearer,
        json={"userId": account.user_id, "provider": "openai", "totalTokens": 1000},
    )
    assert set_quota.status_code == 200, set_quota.text
    refused = gateway.put(
        "/api/v1/openai/faults", headers=account.bearer, json={"failureRate": 1.0}
    )
    assert_error(refused, 403, "FORBIDDEN")
    down = gateway.put("/api/v1/openai/faults", headers=admin.bearer, json={"down": True})
    assert down.status_code == 200, down.text
    try:
        failed = [
            gateway.post(
                "/api/v1/tokens/consume", headers={"X-Api-Key": key["rawKey"]}, json=consume
            )
            for _ in range(3)
        ]
    finally:
        assert gateway.delete("/api/v1/openai/faults", headers=admin.bearer).status_code == 204

    for response in failed:
        assert response.status_code == 502, response.text
        assert response.json()["code"] == "PROVIDER_ERROR"
    # real answers are not failures: the token service's breaker at the gateway stays closed
    breakers = gateway.get("/health").json()["circuitBreakers"]
    assert breakers["tokens"]["state"] == "closed"
    ok = gateway.post("/api/v1/tokens/consume", headers={"X-Api-Key": key["rawKey"]}, json=consume)
    assert ok.status_code == 200, ok.text
    assert ok.json()["allowed"] is True
    # the token service's own bucket headers describe /consume; ours are in RateLimit
    assert ok.headers["X-RateLimit-Limit"] != "120"
    assert ok.headers["RateLimit-Policy"] == '"default";q=120;w=60'


# -- the plan's appendix, through the gateway ----------------------------------------------------


def test_the_gateway_access_appendix_commands(gateway: httpx.Client, admin: Account) -> None:
    # Authentication: register, login, create API key
    username = f"appendix_{uuid.uuid4().hex[:8]}"
    registered = gateway.post(
        "/api/v1/auth/register",
        json={"username": username, "email": f"{username}@test.com", "password": "password123"},
    )
    assert registered.status_code == 201, registered.text
    logged_in = gateway.post(
        "/api/v1/auth/login", json={"username": username, "password": "password123"}
    )
    assert logged_in.status_code == 200, logged_in.text
    token, user_id = logged_in.json()["token"], registered.json()["userId"]
    bearer = {"Authorization": f"Bearer {token}"}
    created = gateway.post(
        "/api/v1/auth/api-keys", headers=bearer, json={"userId": user_id, "name": "key"}
    )
    assert created.status_code == 201, created.text
    api_key = created.json()["rawKey"]
    assert gateway.get("/oauth2/jwks").json()["keys"][0]["alg"] == "RS256"

    # Gateway Access: via API key
    status = gateway.get("/api/v1/tokens/status", headers={"X-Api-Key": api_key})
    assert status.status_code == 200, status.text
    assert status.json()["service"] == "token-service"

    # Gateway Access: via JWT (a quota first, so the answer is the plan's 200)
    gateway.put(
        "/api/v1/tokens/quota",
        headers=admin.bearer,
        json={"userId": user_id, "provider": "openai", "totalTokens": 1000},
    ).raise_for_status()
    quota = gateway.get(f"/api/v1/tokens/quota?userId={user_id}&provider=openai", headers=bearer)
    assert quota.status_code == 200, quota.text
    assert quota.json()["remainingTokens"] == 1000

    # Token operations through the gateway too
    consumed = gateway.post(
        "/api/v1/tokens/consume",
        headers=bearer,
        json={"userId": user_id, "provider": "openai", "tokens": 10, "prompt": "test"},
    )
    assert consumed.status_code == 200, consumed.text
    purchase = gateway.post(
        "/api/v1/tokens/purchase",
        headers={**bearer, "Idempotency-Key": f"key-{uuid.uuid4().hex}"},
        json={"userId": user_id, "provider": "openai", "tokens": 100},
    )
    assert purchase.status_code == 202, purchase.text
    saga = gateway.get(f"/api/v1/tokens/purchase/{purchase.json()['sagaId']}", headers=bearer)
    assert saga.status_code == 200, saga.text

    # Analytics is reached through the gateway as well
    assert gateway.get("/api/v1/analytics/health").status_code == 200


# -- §8.2 (last: it stops the token service) -----------------------------------------------------


def test_scenario_8_2_service_unavailability(gw_stack: GatewayStack, gateway: httpx.Client) -> None:
    _, key = new_key(gateway)
    headers = {"X-Api-Key": key["rawKey"]}
    assert gateway.get("/api/v1/tokens/status", headers=headers).status_code == 200

    # 1. stop the token service
    gw_stack.stop_tokens()

    # 2. through the gateway: 503, and once the breaker is open, the fallback body
    answers = []
    while len(answers) < 10:
        answers.append(gateway.get("/api/v1/tokens/status", headers=headers))
        if answers[-1].json().get("message") == "Circuit breaker open":
            break
    assert [r.status_code for r in answers] == [503] * len(answers)
    *unreachable, fallback = answers
    assert 1 <= len(unreachable) <= 3  # failures counted until the breaker opened
    for response in unreachable:
        assert response.json()["message"] == "token-service unreachable"
    body = assert_error(fallback, 503, "SERVICE_UNAVAILABLE")
    assert {k: body[k] for k in ("service", "status", "message")} == {
        "service": "token-service",
        "status": "unavailable",
        "message": "Circuit breaker open",
    }
    assert set(body) == FALLBACK_FIELDS | ERROR_FIELDS
    assert body["timestamp"].endswith("Z")
    assert int(fallback.headers["Retry-After"]) <= OPEN_SECONDS
    health = gateway.get("/health")
    assert health.status_code == 503
    assert health.json()["circuitBreakers"]["tokens"]["state"] == "open"
    assert 'gateway_circuit_breaker_state{upstream="tokens"} 2.0' in gateway.get("/metrics").text

    # 3. restart it; 4. after the open wait, the next request is let through and succeeds
    gw_stack.start_tokens()
    time.sleep(OPEN_SECONDS + 0.2)
    recovered = gateway.get("/api/v1/tokens/status", headers=headers)
    assert recovered.status_code == 200, recovered.text
    assert recovered.json()["status"] == "UP"
    assert gateway.get("/health").json()["circuitBreakers"]["tokens"]["state"] == "closed"
