"""A restart must not log everyone out (users, keys and signing keys persist), nor undo an
ADMIN's runtime change (feature flags)."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import Stack
from tests.e2e.journeys import (
    ADMIN_PASSWORD,
    Account,
    admin_env,
    create_api_key,
    login,
    register,
)

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


def test_an_admin_flag_change_survives_a_restart_with_conflicting_settings(
    stack_env: tuple,  # type: ignore[type-arg]
) -> None:
    """Issue 10: settings seed a flag only when it was never set; the API's value then stands."""
    workdir, env, shape = stack_env
    stack = Stack(workdir, env, shape)
    settings = {
        **admin_env("e2e_flags_admin"),
        "LEAKY_TOKENS__FLAGS": json.dumps({"payment.decline": False}),
    }
    only = ("--skip", "gateway,analytics,qwen,gemini,openai")
    first = stack.up(*only, name="flags-first", extra_env=settings)
    try:
        with stack.client("auth") as auth, stack.client("tokens") as tokens:
            admin = login(auth, Account("", "e2e_flags_admin", ADMIN_PASSWORD, ""))
            seeded = tokens.get("/api/v1/tokens/admin/flags", headers=admin.bearer).json()
            assert seeded["flags"]["payment.decline"] is False
            assert seeded["sources"]["payment.decline"]["source"] == "settings"
            assert seeded["sources"]["saga.simulate-failure"] == {
                "source": "default",
                "updatedAt": None,
            }
            changed = tokens.put(
                "/api/v1/tokens/admin/flags/payment.decline",
                headers=admin.bearer,
                json={"enabled": True},
            )
            assert changed.status_code == 200, changed.text
            assert changed.json()["sources"]["payment.decline"]["source"] == "admin"
    finally:
        first.stop()
    stack.up(*only, name="flags-second", extra_env=settings)  # the same, conflicting settings
    try:
        with stack.client("auth") as auth, stack.client("tokens") as tokens:
            admin = login(auth, Account("", "e2e_flags_admin", ADMIN_PASSWORD, ""))
            after = tokens.get("/api/v1/tokens/admin/flags", headers=admin.bearer).json()
            assert after["flags"]["payment.decline"] is True
            assert after["sources"]["payment.decline"]["source"] == "admin"
    finally:
        stack.stop_all()
