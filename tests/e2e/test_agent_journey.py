"""TS-7: the agent journey of `spec/e2e-and-security-tests.txt` end to end against `leaky-tokens
up`, in both shapes: health, register, token, account, products, balance, a session opened
with an idempotency key and used through its credential, telemetry, health, rotation, a
recharge order, stats, and termination giving back what is left."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.agent_api import (
    agent_stack,
    available,
    consume_through,
    eventually,
    failed,
    ok,
    open_session,
    page,
    recharge,
    register,
)
from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def system(stack_env: tuple[Path, dict[str, str], str]) -> Iterator[Stack]:
    with agent_stack(stack_env) as running:
        yield running


@pytest.fixture(scope="module")
def gateway(system: Stack) -> Iterator[httpx.Client]:
    with system.client("gateway") as client:
        yield client


def test_the_agent_journey_from_registration_to_termination(gateway: httpx.Client) -> None:
    # Health
    assert ok(gateway.get("/v1/health"))["status"] == "ok"

    # Register: a key and a secret, the secret shown once
    agent = register(gateway)

    # Auth: key + secret -> a Bearer token, used from here on
    token = ok(
        gateway.post(
            "/v1/auth/token", json={"api_key": agent.api_key, "api_secret": agent.api_secret}
        )
    )
    assert token["token_type"] == "Bearer"
    assert token["expires_in"] > 0
    bearer = {"Authorization": f"Bearer {token['access_token']}"}
    failed(
        gateway.post("/v1/auth/token", json={"api_key": agent.api_key, "api_secret": "wrong"}),
        401,
        "AUTH_INVALID_KEY",
    )

    # Account info, with the Bearer token and with the key
    info = ok(gateway.get("/v1/account/info", headers=bearer))
    assert info["agent_id"] == agent.agent_id
    assert info["auth_method"] == "bearer"
    assert ok(gateway.get("/v1/account/info", headers=agent.key))["auth_method"] == "api_key"

    # Products: a dynamic one and a static one
    products, _ = page(gateway.get("/v1/products", headers=bearer, params={"page_size": 100}))
    types = {p["type"] for p in products}
    assert types == {"dynamic", "static"}, products
    dynamic = next(p for p in products if p["type"] == "dynamic")
    assert len({m["provider"] for m in dynamic["models"]}) >= 2
    assert all(len(p["models"]) == 1 for p in products if p["type"] == "static")

    # Balance: nothing yet; a recharge order (no real payment) funds it
    assert available(gateway, agent) == 0
    recharge(gateway, agent, 5000)
    assert available(gateway, agent) == 5000

    # A dynamic session with an Idempotency-Key; polled until active
    key = uuid.uuid4().hex
    body = {"product_no": dynamic["product_no"], "token_budget": 1200}
    created = ok(
        gateway.post("/v1/sessions", headers={**bearer, "Idempotency-Key": key}, json=body), 201
    )
    session_id = created["session_id"]
    session = eventually(
        lambda: (
            (s := ok(gateway.get(f"/v1/sessions/{session_id}", headers=bearer)))
            and s["status"] == "active"
            and s
        ),
        what="session active",
    )
    assert session["token_budget"] == 1200
    assert session["budget_remaining"] == 1200
    assert available(gateway, agent) == 5000 - 1200  # the budget left the pool
    proxy = session["proxy"]
    assert proxy["full_url"].endswith(f"/v1/s/{proxy['api_key']}")
    # The same key and body: the same session, not a second one
    again = ok(gateway.post("/v1/sessions", headers={**bearer, "Idempotency-Key": key}, json=body))
    assert again["session_id"] == session_id

    # Use the session: its credential is charged to its budget, never to the pool
    spent = consume_through(gateway, agent, proxy["api_key"], 150)
    assert spent.status_code == 200, spent.text
    after = ok(gateway.get(f"/v1/sessions/{session_id}", headers=bearer))
    assert after["budget_remaining"] == 1200 - 150
    assert after["tokens_used"] == 150
    assert available(gateway, agent) == 5000 - 1200

    # Telemetry, then the session's health
    for event in (
        {"type": "success", "status_code": 200, "latency_ms": 180},
        {"type": "success", "status_code": 200, "latency_ms": 220},
        {"type": "http_error", "status_code": 503, "latency_ms": 30, "message": "upstream down"},
    ):
        ok(
            gateway.post(f"/v1/sessions/{session_id}/report-event", headers=bearer, json=event),
            201,
        )
    health = ok(gateway.get(f"/v1/sessions/{session_id}/health", headers=bearer))
    assert health["events_considered"] == 3
    assert health["error_count"] == 1
    assert health["success_rate"] == pytest.approx(2 / 3)
    assert health["status"] == "degraded"  # 2/3 is below 0.9, not below 0.5
    assert health["last_error"]["status_code"] == 503
    assert health["budget_remaining"] == 1050

    # Rotate: a dynamic session moves to the next model, on a new credential
    rotated = ok(
        gateway.post(
            f"/v1/sessions/{session_id}/rotate", headers=bearer, json={"reason": "503s from openai"}
        )
    )
    assert rotated["rotation"]["moved"] is True
    assert rotated["model"] != session["model"]
    assert rotated["rotation"]["reason"]
    new_credential = rotated["proxy"]["api_key"]
    assert new_credential != proxy["api_key"]
    assert rotated["budget_remaining"] == 1050  # the budget stays with the session
    eventually(
        lambda: consume_through(gateway, agent, proxy["api_key"], 1).status_code == 401,
        within=10,
        what="old credential refused",
    )
    assert consume_through(gateway, agent, new_credential, 50).status_code == 200
    health = ok(gateway.get(f"/v1/sessions/{session_id}/health", headers=bearer))
    assert health["last_rotation"]["reason"] == "503s from openai"

    # A recharge order and its status
    order_id = recharge(gateway, agent, 300)
    status = ok(gateway.get(f"/v1/billing/recharge/{order_id}/status", headers=bearer))
    assert status["status"] == "completed"
    assert status["tokens"] == 300

    # Stats
    stats = ok(gateway.get("/v1/stats/overview", headers=bearer))
    assert stats["sessions"]["active"] == 1
    assert stats["tokens"]["active_budget_remaining"] == 1000

    # Terminate: what is left goes back, once; the credential dies
    closed = ok(gateway.post(f"/v1/sessions/{session_id}/terminate", headers=bearer))
    assert closed["status"] == "terminated"
    assert closed["proxy"] is None
    assert closed["tokens_returned"] == 1000
    assert closed["tokens_used"] == 200
    final = ok(gateway.get(f"/v1/sessions/{session_id}", headers=bearer))
    assert final["status"] == "terminated"
    assert available(gateway, agent) == 5000 + 300 - 200
    ok(gateway.post(f"/v1/sessions/{session_id}/terminate", headers=bearer))  # idempotent
    assert available(gateway, agent) == 5000 + 300 - 200
    eventually(
        lambda: consume_through(gateway, agent, new_credential, 1).status_code == 401,
        within=10,
        what="terminated session's credential refused",
    )


def test_an_expired_session_gives_its_budget_back_and_its_credential_stops(
    gateway: httpx.Client,
) -> None:
    agent = register(gateway)
    recharge(gateway, agent, 1000)
    session = ok(
        gateway.post(
            "/v1/sessions",
            headers={**agent.key, "Idempotency-Key": uuid.uuid4().hex},
            json={"product_no": "dynamic-chat", "token_budget": 400, "lifetime_seconds": 2},
        ),
        201,
    )
    credential = session["proxy"]["api_key"]
    assert consume_through(gateway, agent, credential, 100).status_code == 200
    expired = eventually(
        lambda: (
            (s := ok(gateway.get(f"/v1/sessions/{session['session_id']}", headers=agent.key)))
            and s["status"] == "expired"
            and s
        ),
        what="session expired",
    )
    assert expired["tokens_returned"] == 300
    assert expired["tokens_used"] == 100
    assert available(gateway, agent) == 900
    refused = consume_through(gateway, agent, credential, 1)
    assert refused.status_code == 401
    assert refused.json()["code"] == "AUTH_EXPIRED_KEY"


def test_a_session_the_pool_cannot_fund_fails_with_insufficient_balance(
    gateway: httpx.Client,
) -> None:
    agent = register(gateway)
    recharge(gateway, agent, 100)
    key = uuid.uuid4().hex
    body = {"product_no": "dynamic-chat", "token_budget": 101}
    failed(
        gateway.post("/v1/sessions", headers={**agent.key, "Idempotency-Key": key}, json=body),
        402,
        "INSUFFICIENT_BALANCE",
    )
    # The replay answers the same, and nothing left the pool.
    failed(
        gateway.post("/v1/sessions", headers={**agent.key, "Idempotency-Key": key}, json=body),
        402,
        "INSUFFICIENT_BALANCE",
    )
    assert available(gateway, agent) == 100
    items, _ = page(gateway.get("/v1/sessions", headers=agent.key))
    assert [s["status"] for s in items] == ["failed"]


def test_a_request_through_proxy_full_url_with_the_openai_sdk_is_charged_to_the_session(
    gateway: httpx.Client,
) -> None:
    agent = register(gateway)
    recharge(gateway, agent, 5000)
    session = open_session(gateway, agent, 2000, product="static-gpt-4o-mini")
    proxy = session["proxy"]
    pool = available(gateway, agent)

    # An agent that can only be given a base URL: the credential is in it.
    client = openai.OpenAI(base_url=proxy["full_url"], api_key="unused", max_retries=0)
    answer = client.chat.completions.create(
        model=proxy["model"],
        messages=[{"role": "user", "content": "Say hello to the session."}],
        max_tokens=20,
    )
    assert answer.choices[0].message.content
    assert answer.usage is not None
    used = answer.usage.total_tokens
    after = ok(gateway.get(f"/v1/sessions/{session['session_id']}", headers=agent.key))
    assert after["tokens_used"] == used
    assert after["budget_remaining"] == 2000 - used

    # An SDK that wants a key: base_url + api_key; streamed, usage asked for.
    keyed = openai.OpenAI(base_url=proxy["base_url"], api_key=proxy["api_key"], max_retries=0)
    chunks = list(
        keyed.chat.completions.create(
            model=proxy["model"],
            messages=[{"role": "user", "content": "Stream something short."}],
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = next(c.usage for c in reversed(chunks) if c.usage is not None)
    after = ok(gateway.get(f"/v1/sessions/{session['session_id']}", headers=agent.key))
    assert after["tokens_used"] == used + streamed.total_tokens
    assert after["budget_remaining"] == 2000 - used - streamed.total_tokens
    assert available(gateway, agent) == pool  # the pool paid nothing: the session did

    # The gateway saw those calls, and a failing one, for the session's health.
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "Hi"}]
        )

    def gateway_saw_three() -> dict[str, Any] | None:
        health = ok(gateway.get(f"/v1/sessions/{session['session_id']}/health", headers=agent.key))
        return health if health["by_source"]["gateway"]["events"] >= 3 else None

    health = eventually(gateway_saw_three, what="gateway events recorded")
    assert health["by_source"]["gateway"] == {"events": 3, "errors": 1}
    assert health["last_error"]["source"] == "gateway"
    assert health["last_error"]["status_code"] == 404
    assert health["errors_by_kind"] == {"client": 1}
    assert health["mean_latency_ms"] is not None

    # Ended: the base URL stops working.
    ok(gateway.post(f"/v1/sessions/{session['session_id']}/terminate", headers=agent.key))

    def refused() -> bool:
        try:
            client.models.list()
        except openai.AuthenticationError:
            return True
        return False

    eventually(refused, within=10, what="terminated session's base URL refused")
    assert available(gateway, agent) == pool + 2000 - used - streamed.total_tokens


def test_rotation_skips_a_provider_whose_circuit_breaker_is_open(
    system: Stack, gateway: httpx.Client
) -> None:
    internal = {"X-Internal-Token": system.internal_token()}
    with system.client("qwen") as qwen:
        down = qwen.put("/api/v1/qwen/faults", headers=internal, json={"down": True})
        assert down.status_code == 200, down.text
        try:
            agent = register(gateway)
            recharge(gateway, agent, 2000)
            recharge(gateway, agent, 1000, provider="qwen")
            session = open_session(gateway, agent, 500)
            assert session["model"] == "gpt-4o-mini"  # the product's first model
            qwen_call = {"userId": agent.agent_id, "provider": "qwen", "tokens": 1, "prompt": "x"}

            def breaker_open() -> bool:
                failed_call = gateway.post(
                    "/api/v1/tokens/consume", headers=agent.key, json=qwen_call
                )
                assert failed_call.status_code in (502, 503), failed_call.text
                status = gateway.get("/api/v1/tokens/status").json()
                return bool(status["providers"]["qwen"]["state"] == "open")

            eventually(breaker_open, within=60, every=0.05, what="qwen's breaker open")
            rotated = ok(
                gateway.post(
                    f"/v1/sessions/{session['session_id']}/rotate",
                    headers=agent.key,
                    json={"reason": "openai is slow"},
                )
            )
            # The next model is qwen-turbo, whose provider is refused: the one after it.
            assert rotated["rotation"]["moved"] is True
            assert rotated["rotation"]["to_provider"] == "gemini"
            assert rotated["model"] == "gemini-2.5-flash"
        finally:
            qwen.delete("/api/v1/qwen/faults", headers=internal)


def test_a_static_session_rotates_its_credential_only(gateway: httpx.Client) -> None:
    agent = register(gateway)
    recharge(gateway, agent, 1000)
    session = open_session(gateway, agent, 300, product="static-gpt-4o-mini")
    old = session["proxy"]["api_key"]
    rotated = ok(
        gateway.post(
            f"/v1/sessions/{session['session_id']}/rotate",
            headers=agent.key,
            json={"reason": "credential leaked in a log"},
        )
    )
    assert rotated["rotation"]["moved"] is False
    assert rotated["model"] == rotated["rotation"]["to_model"] == "gpt-4o-mini"
    assert rotated["rotation"]["reason"] == "credential leaked in a log"
    assert rotated["proxy"]["api_key"] != old
    assert rotated["rotations"] == 1
    eventually(
        lambda: consume_through(gateway, agent, old, 1).status_code == 401,
        within=10,
        what="old credential refused",
    )
    assert consume_through(gateway, agent, rotated["proxy"]["api_key"], 10).status_code == 200
    # A session that has ended cannot be rotated.
    ok(gateway.post(f"/v1/sessions/{session['session_id']}/terminate", headers=agent.key))
    failed(
        gateway.post(
            f"/v1/sessions/{session['session_id']}/rotate", headers=agent.key, json={"reason": "x"}
        ),
        409,
        "SESSION_NOT_ACTIVE",
    )
