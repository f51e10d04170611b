"""Steps every e2e module repeats: register, log in, make a key, as the plan does them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

ERROR_FIELDS = {"message", "timestamp", "code", "requestId"}
ADMIN_PASSWORD = "admin-password-123"


def admin_env(username: str) -> dict[str, str]:
    """Environment that makes the auth service bootstrap this ADMIN at start-up."""
    return {"LEAKY_ADMIN_USERNAME": username, "LEAKY_ADMIN_PASSWORD": ADMIN_PASSWORD}


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """An error answer in DESIGN.md's shape, its requestId the X-Request-Id header."""
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body.keys() >= ERROR_FIELDS, body
    assert body["code"] == code, body
    assert body["requestId"] == response.headers["X-Request-Id"]
    datetime.fromisoformat(body["timestamp"])
    return body


def detail_fields(body: dict[str, Any]) -> set[str]:
    return {d["field"] for d in body.get("details", [])}


@dataclass
class Account:
    user_id: str
    username: str
    password: str
    token: str

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def register(auth: httpx.Client, prefix: str = "user") -> Account:
    username = f"{prefix}_{uuid.uuid4().hex[:10]}"
    password = "password123"
    response = auth.post(
        "/api/v1/auth/register",
        json={"username": username, "email": f"{username}@example.com", "password": password},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    return Account(body["userId"], username, password, body["token"])


def login(auth: httpx.Client, account: Account) -> Account:
    response = auth.post(
        "/api/v1/auth/login", json={"username": account.username, "password": account.password}
    )
    assert response.status_code == 200, response.text
    account.token = response.json()["token"]
    return account


def create_api_key(
    auth: httpx.Client, account: Account, name: str = "cli-access"
) -> dict[str, str]:
    expires = (datetime.now(UTC) + timedelta(days=30)).isoformat().replace("+00:00", "Z")
    response = auth.post(
        "/api/v1/auth/api-keys",
        headers=account.bearer,
        json={"userId": account.user_id, "name": name, "expiresAt": expires},
    )
    assert response.status_code == 201, response.text
    body: dict[str, str] = response.json()
    return body
