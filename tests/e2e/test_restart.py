"""A restart must not log everyone out: users, keys and signing keys persist."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Stack
from tests.e2e.journeys import create_api_key, register

pytestmark = pytest.mark.e2e


def test_restart_keeps_users_keys_and_signing_keys(stack_env: tuple) -> None:  # type: ignore[type-arg]
    workdir, env, shape = stack_env
    stack = Stack(workdir, env, shape)
    first = stack.up("--skip", "gateway,analytics,qwen,gemini,openai", name="first")
    try:
        with stack.client("auth") as auth:
            account = register(auth)
            key = create_api_key(auth, account)["rawKey"]
            kid_before = auth.get("/oauth2/jwks").json()["keys"][0]["kid"]
    finally:
        first.stop()
    stack.up("--skip", "gateway,analytics,qwen,gemini,openai", name="second")
    try:
        with stack.client("auth") as auth:
            assert auth.get("/oauth2/jwks").json()["keys"][0]["kid"] == kid_before
            me = auth.get("/api/v1/auth/me", headers=account.bearer)
            assert me.status_code == 200
            assert me.json()["userId"] == account.user_id
            relogin = auth.post(
                "/api/v1/auth/login", json={"username": account.username, "password": "password123"}
            )
            assert relogin.status_code == 200
            assert (
                auth.get("/api/v1/auth/api-keys/validate", headers={"X-Api-Key": key}).status_code
                == 200
            )
        with stack.client("tokens") as tokens:
            # a token issued before the restart still verifies at another service (via JWKS)
            quota = tokens.get(
                f"/api/v1/tokens/quota?userId={account.user_id}&provider=openai",
                headers=account.bearer,
            )
            assert quota.status_code in (200, 404)
    finally:
        stack.stop_all()
