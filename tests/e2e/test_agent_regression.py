"""TS-3: a walk over every endpoint of the agent API, in both shapes, checking the envelope on
success and on error, the pagination fields of every list, and the error-code table: no
credential -> 401 AUTH_INVALID_KEY, an invalid body -> 400 INVALID_REQUEST, an unknown or
another tenant's session -> 404 SESSION_NOT_FOUND."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from leaky_tokens.agents.router import router
from tests.e2e.agent_api import (
    agent_stack,
    failed,
    ok,
    open_session,
    page,
    recharge,
    register,
)
from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e

SESSION = "{session_id}"
ORDER = "{order_id}"
# Every route of the agent API, as the walk below calls it: (method, path, body, status).
WALK: tuple[tuple[str, str, dict[str, Any] | None, int], ...] = (
    ("GET", "/v1/health", None, 200),
    ("POST", "/v1/account/register", {"name": "{new_name}"}, 201),
    ("POST", "/v1/auth/token", {"api_key": "{api_key}", "api_secret": "{api_secret}"}, 200),
    ("GET", "/v1/account/info", None, 200),
    ("GET", "/v1/products", None, 200),
    ("GET", "/v1/billing/balance", None, 200),
    ("POST", "/v1/billing/recharge", {"provider": "openai", "tokens": 10}, 202),
    ("GET", f"/v1/billing/recharge/{ORDER}/status", None, 200),
    ("POST", "/v1/sessions", {"product_no": "dynamic-chat", "token_budget": 10}, 201),
    ("GET", "/v1/sessions", None, 200),
    ("GET", f"/v1/sessions/{SESSION}", None, 200),
    ("POST", f"/v1/sessions/{SESSION}/report-event", {"type": "success"}, 201),
    ("GET", f"/v1/sessions/{SESSION}/health", None, 200),
    ("POST", f"/v1/sessions/{SESSION}/rotate", {"reason": "regression walk"}, 200),
    ("GET", "/v1/stats/overview", None, 200),
    ("POST", f"/v1/sessions/{SESSION}/terminate", None, 200),
)
LISTS = ("/v1/products", "/v1/billing/balance", "/v1/sessions")
PUBLIC = {"/v1/health", "/v1/account/register", "/v1/auth/token"}
SESSION_ROUTES = [(m, p, b) for m, p, b, _ in WALK if SESSION in p]
BAD_BODIES: dict[str, list[Any]] = {
    "/v1/account/register": [{}, {"name": "x"}, {"name": "ok_name", "extra": 1}, "not json"],
    "/v1/auth/token": [{}, {"api_key": "k"}, {"api_key": 1, "api_secret": 2}],
    "/v1/billing/recharge": [{}, {"provider": "openai", "tokens": 0}, {"tokens": "many"}],
    "/v1/sessions": [
        {},
        {"product_no": "dynamic-chat"},
        {"product_no": "dynamic-chat", "token_budget": -1},
        {"product_no": "no-such-product", "token_budget": 10},
        {"product_no": "dynamic-chat", "token_budget": 10, "lifetime_seconds": 0},
        {"product_no": "dynamic-chat", "token_budget": 10, "colour": "red"},
    ],
    f"/v1/sessions/{SESSION}/report-event": [
        {},
        {"type": "maybe"},
        {"type": "success", "status_code": 42},
    ],
    f"/v1/sessions/{SESSION}/rotate": [{}, {"reason": ""}],
}


@pytest.fixture(scope="module")
def system(stack_env: tuple[Path, dict[str, str], str]) -> Iterator[Stack]:
    with agent_stack(stack_env) as running:
        yield running


@pytest.fixture(scope="module")
def gateway(system: Stack) -> Iterator[httpx.Client]:
    with system.client("gateway") as client:
        yield client


def _send(
    gateway: httpx.Client,
    method: str,
    path: str,
    body: Any,
    headers: dict[str, str],
) -> httpx.Response:
    if isinstance(body, str):
        return gateway.request(
            method, path, headers={**headers, "content-type": "application/json"}, content=body
        )
    return gateway.request(method, path, headers=headers, json=body)


def test_the_walk_covers_every_route_of_the_agent_api() -> None:
    routes = {
        (method, route.path)  # type: ignore[attr-defined]
        for route in router.routes
        for method in route.methods  # type: ignore[attr-defined]
    }
    walked = {
        (m, p.replace(SESSION, "{session_id}").replace(ORDER, "{order_id}")) for m, p, _, _ in WALK
    }
    assert routes == walked


def test_every_endpoint_answers_success_in_the_envelope(gateway: httpx.Client) -> None:
    agent = register(gateway)
    recharge(gateway, agent, 1000)
    values = {
        "new_name": f"walk_{uuid.uuid4().hex[:8]}",
        "api_key": agent.api_key,
        "api_secret": agent.api_secret,
    }
    headers = {**agent.key}
    for method, template, body, status in WALK:
        sent = None
        if body is not None:
            sent = {k: (v.format(**values) if isinstance(v, str) else v) for k, v in body.items()}
        if method == "POST":
            headers = {**agent.key, "Idempotency-Key": uuid.uuid4().hex}
        path = template.format(**values)
        response = _send(gateway, method, path, sent, headers if path not in PUBLIC else {})
        data = ok(response, status)
        if method == "GET" and path in LISTS:
            page(response)
        if path == "/v1/billing/recharge":
            values["order_id"] = data["order_id"]
        if path == "/v1/sessions" and method == "POST":
            values["session_id"] = data["session_id"]


def test_every_list_pages_with_items_and_pagination(gateway: httpx.Client) -> None:
    agent = register(gateway)
    recharge(gateway, agent, 1000)
    for _ in range(3):
        open_session(gateway, agent, 10)
    first, pagination = page(
        gateway.get("/v1/sessions", headers=agent.key, params={"page_size": 2})
    )
    assert pagination == {"page": 1, "page_size": 2, "total": 3, "total_pages": 2}
    second, _ = page(
        gateway.get("/v1/sessions", headers=agent.key, params={"page": 2, "page_size": 2})
    )
    assert len(first) == 2
    assert len(second) == 1
    assert {s["session_id"] for s in first}.isdisjoint(s["session_id"] for s in second)
    beyond, _ = page(
        gateway.get("/v1/sessions", headers=agent.key, params={"page": 3, "page_size": 2})
    )
    assert beyond == []
    active, total = page(
        gateway.get("/v1/sessions", headers=agent.key, params={"status": "active"})
    )
    assert total["total"] == 3
    assert len(active) == 3
    products, paging = page(gateway.get("/v1/products", headers=agent.key, params={"page_size": 1}))
    assert len(products) == 1
    assert paging["total"] >= 2
    pools, _ = page(gateway.get("/v1/billing/balance", headers=agent.key))
    assert [p["provider"] for p in pools] == ["openai"]
    for path in LISTS:
        for params in ({"page": 0}, {"page_size": 0}, {"page_size": 101}, {"page": "x"}):
            failed(gateway.get(path, headers=agent.key, params=params), 400, "INVALID_REQUEST")


def test_no_credential_is_401_auth_invalid_key(gateway: httpx.Client) -> None:
    for method, template, body, _ in WALK:
        path = template.format(session_id=uuid.uuid4(), order_id=uuid.uuid4())
        if path in PUBLIC:
            continue
        failed(_send(gateway, method, path, body, {}), 401, "AUTH_INVALID_KEY")


def test_an_invalid_body_is_400_invalid_request(gateway: httpx.Client) -> None:
    agent = register(gateway)
    recharge(gateway, agent, 1000)
    session = open_session(gateway, agent, 10)
    for template, bodies in BAD_BODIES.items():
        path = template.format(session_id=session["session_id"])
        headers = {} if path in PUBLIC else agent.key
        for body in bodies:
            error = failed(_send(gateway, "POST", path, body, headers), 400, "INVALID_REQUEST")
            assert error["message"]
    # A body that is not JSON at all, and none where one is needed.
    failed(
        gateway.post(
            "/v1/sessions", headers={**agent.key, "content-type": "application/json"}, content=b"{"
        ),
        400,
        "INVALID_REQUEST",
    )
    failed(gateway.post("/v1/sessions", headers=agent.key), 400, "INVALID_REQUEST")


def test_an_unknown_or_another_tenant_s_session_is_404_session_not_found(
    gateway: httpx.Client,
) -> None:
    owner = register(gateway)
    recharge(gateway, owner, 1000)
    theirs = open_session(gateway, owner, 10)["session_id"]
    stranger = register(gateway)
    for session_id in (str(uuid.uuid4()), "not-a-session-id", theirs):
        for method, template, body in SESSION_ROUTES:
            path = template.format(session_id=session_id)
            failed(_send(gateway, method, path, body, stranger.key), 404, "SESSION_NOT_FOUND")


def test_other_errors_keep_the_envelope(gateway: httpx.Client) -> None:
    agent = register(gateway)
    failed(gateway.get("/v1/sessions/x/unknown", headers=agent.key), 404, "NOT_FOUND")
    failed(gateway.delete("/v1/sessions", headers=agent.key), 405, "METHOD_NOT_ALLOWED")
    failed(gateway.put("/v1/health"), 405, "METHOD_NOT_ALLOWED")
    failed(
        gateway.get(f"/v1/billing/recharge/{uuid.uuid4()}/status", headers=agent.key),
        404,
        "ORDER_NOT_FOUND",
    )
    failed(
        gateway.post(
            "/v1/sessions",
            headers={**agent.key, "Idempotency-Key": "x" * 101},
            json={"product_no": "dynamic-chat", "token_budget": 10},
        ),
        400,
        "INVALID_REQUEST",
    )
    taken = gateway.post("/v1/account/register", json={"name": agent.name})
    failed(taken, 400, "ACCOUNT_EXISTS")  # auth names no field (issue 10)
    # refused at the gateway's edge, before the agent API runs: still its envelope
    too_big = gateway.post(
        "/v1/sessions",
        headers={**agent.key, "content-type": "application/json"},
        content=b" " * (2 * 1024 * 1024),
    )
    assert too_big.status_code == 413, too_big.text  # (no rate-limit headers: no key was read)
    body = too_big.json()
    assert body["success"] is False, body
    assert body["data"] is None, body
    assert body["error"]["code"] == "PAYLOAD_TOO_LARGE", body
    assert body["meta"]["request_id"] == too_big.headers["x-request-id"], body
