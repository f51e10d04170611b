"""Steps and checks the agent-API suites share (issue 13): the envelope, an agent's account,
funding it through a recharge order, and opening a session."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import Stack

ENVELOPE_FIELDS = {"success", "data", "error", "meta"}
PAGINATION_FIELDS = {"page", "page_size", "total", "total_pages"}
REQUEST_ID = re.compile(r"^req_[0-9a-f]{32}$")
RATE_LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


@contextmanager
def agent_stack(
    stack_env: tuple[Path, dict[str, str], str], extra: dict[str, str] | None = None
) -> Iterator[Stack]:
    """`leaky-tokens up` for an agent-API module. Its rate-limit windows live under a key
    prefix of its own: in the distributed shape every stack shares one Redis, and the agent
    API counts unauthenticated calls (registrations) per address."""
    workdir, env, shape = stack_env
    prefix = {"LEAKY_GATEWAY__RATE_LIMIT_KEY_PREFIX": f"lt:test:{uuid.uuid4().hex}:"}
    running = Stack(workdir, {**env, **prefix, **(extra or {})}, shape)
    running.up()
    try:
        yield running
    finally:
        running.stop_all()


def _meta(body: dict[str, Any], response: httpx.Response) -> None:
    meta = body["meta"]
    assert REQUEST_ID.match(meta["request_id"]), meta
    assert meta["request_id"] == response.headers["X-Request-Id"]
    stamp = datetime.fromisoformat(meta["timestamp"].replace("Z", "+00:00"))
    assert stamp.tzinfo is not None, meta


def ok(response: httpx.Response, status: int = 200) -> Any:
    """The data of a success envelope (and the envelope's contract checked)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == ENVELOPE_FIELDS, body
    assert body["success"] is True, body
    assert body["error"] is None, body
    _meta(body, response)
    for name in RATE_LIMIT_HEADERS:
        assert name in response.headers, (name, response.headers)
    return body["data"]


def failed(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The error of an error envelope with this status and code."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == ENVELOPE_FIELDS, body
    assert body["success"] is False, body
    assert body["data"] is None, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    _meta(body, response)
    for name in RATE_LIMIT_HEADERS:
        assert name in response.headers, (name, response.headers)
    error: dict[str, Any] = body["error"]
    return error


def page(response: httpx.Response) -> tuple[list[Any], dict[str, Any]]:
    data = ok(response)
    assert set(data) == {"items", "pagination"}, data
    pagination = data["pagination"]
    assert set(pagination) == PAGINATION_FIELDS, pagination
    assert all(isinstance(pagination[k], int) for k in PAGINATION_FIELDS), pagination
    total, size = pagination["total"], pagination["page_size"]
    assert pagination["total_pages"] == (-(-total // size) if total else 0), pagination
    assert len(data["items"]) <= size
    return data["items"], pagination


@dataclass
class Agent:
    agent_id: str
    name: str
    api_key: str
    api_secret: str

    @property
    def key(self) -> dict[str, str]:
        return {"X-API-Key": self.api_key}


def register(gateway: httpx.Client, prefix: str = "agent") -> Agent:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    data = ok(gateway.post("/v1/account/register", json={"name": name}), 201)
    assert data["name"] == name
    return Agent(data["agent_id"], name, data["api_key"], data["api_secret"])


def eventually(
    check: Callable[[], Any], *, within: float = 30.0, every: float = 0.1, what: str = "it"
) -> Any:
    """Poll `check()` until it returns something truthy (generous deadline: loaded machines)."""
    deadline = time.monotonic() + within
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within}s")
        time.sleep(every)


def recharge(gateway: httpx.Client, agent: Agent, tokens: int, provider: str = "openai") -> str:
    """A recharge order (a purchase saga, stub payment), waited for until completed."""
    order = ok(
        gateway.post(
            "/v1/billing/recharge",
            headers={**agent.key, "Idempotency-Key": uuid.uuid4().hex},
            json={"provider": provider, "tokens": tokens},
        ),
        202,
    )

    def completed() -> bool:
        status = ok(
            gateway.get(f"/v1/billing/recharge/{order['order_id']}/status", headers=agent.key)
        )
        assert status["status"] in ("pending", "completed"), status
        return bool(status["status"] == "completed")

    eventually(completed, what="recharge order completed")
    return str(order["order_id"])


def available(gateway: httpx.Client, agent: Agent, provider: str = "openai") -> int:
    items, _ = page(gateway.get("/v1/billing/balance", headers=agent.key))
    return sum(p["available_tokens"] for p in items if p["provider"] == provider)


def open_session(
    gateway: httpx.Client,
    agent: Agent,
    budget: int,
    *,
    product: str = "dynamic-chat",
    lifetime: int | None = None,
    key: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"product_no": product, "token_budget": budget}
    if lifetime is not None:
        body["lifetime_seconds"] = lifetime
    data = ok(
        gateway.post(
            "/v1/sessions",
            headers={**agent.key, "Idempotency-Key": key or uuid.uuid4().hex},
            json=body,
        ),
        201,
    )
    assert data["status"] == "active", data
    session: dict[str, Any] = data
    return session


def consume_through(
    gateway: httpx.Client, agent: Agent, credential: str, tokens: int
) -> httpx.Response:
    """Spend through a session's credential on the plan's /consume (charged to the session)."""
    return gateway.post(
        "/api/v1/tokens/consume",
        headers={"X-API-Key": credential},
        json={"userId": agent.agent_id, "provider": "openai", "tokens": tokens, "prompt": "hi"},
    )
