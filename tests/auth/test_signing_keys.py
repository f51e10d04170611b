"""Signing keys and bearer verification (plan §1.4): JWKS, persistence, rotation, forgeries."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from tests.auth.auth_harness import (
    PASSWORD,
    Account,
    AuthClient,
    StartAuth,
    assert_error,
    foreign_key,
    now_clock,
    private_key,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROTATE = "/api/v1/auth/admin/signing-keys/rotate"


def _claims(account: Account, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": account.user_id,
        "username": account.username,
        "roles": ["USER"],
        "orgs": [],
        "iss": "leaky-tokens",
        "iat": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _kid(token: str) -> str:
    kid: str = jwt.get_unverified_header(token)["kid"]
    return kid


async def _rotate(auth: AuthClient, admin: Account) -> str:
    response = await auth.http.post(ROTATE, headers=admin.headers)
    assert response.status_code == 200, response.text
    kid: str = response.json()["kid"]
    return kid


async def test_the_jwks_lists_the_key_that_signs_tokens(start_auth: StartAuth) -> None:
    async with start_auth() as auth:
        account = await auth.register()

        keys = await auth.jwks()

        assert [k["kid"] for k in keys] == [_kid(account.token)]
        assert set(keys[0]) == {"kty", "use", "alg", "kid", "n", "e"}
        same = await auth.http.get("/api/v1/auth/jwks")
        assert same.json() == {"keys": keys}


async def test_a_restarted_service_keeps_its_key_and_accepts_its_old_tokens(
    start_auth: StartAuth,
) -> None:
    async with start_auth() as before:
        account = await before.register()
        kid_before = [k["kid"] for k in await before.jwks()]

    async with start_auth() as after:
        assert [k["kid"] for k in await after.jwks()] == kid_before
        response = await after.me(account.headers)
        assert response.status_code == 200, response.text
        assert response.json()["userId"] == account.user_id


async def test_only_an_admin_may_rotate_the_signing_key(auth: AuthClient) -> None:
    user = await auth.register()
    keys = await auth.jwks()

    assert_error(await auth.http.post(ROTATE, headers=user.headers), 403, "FORBIDDEN")
    assert_error(await auth.http.post(ROTATE), 401, "AUTH_INVALID_KEY")
    assert await auth.jwks() == keys


async def test_rotation_signs_with_a_new_key_and_still_accepts_the_previous_one(
    start_auth: StartAuth,
) -> None:
    async with start_auth() as auth:
        admin = await auth.admin()
        user = await auth.register()
        old_kid = _kid(user.token)

        new_kid = await _rotate(auth, admin)

        assert new_kid != old_kid
        assert [k["kid"] for k in await auth.jwks()] == [new_kid, old_kid]
        fresh = (await auth.login(user.username, PASSWORD)).json()["token"]
        assert _kid(fresh) == new_kid
        assert (await auth.me(user.headers)).status_code == 200
        assert (await auth.me({"Authorization": f"Bearer {fresh}"})).status_code == 200


async def test_a_rotation_on_a_replica_whose_clock_lags_still_signs_with_the_new_key(
    start_auth: StartAuth,
) -> None:
    ahead = now_clock()
    behind = now_clock()
    behind.advance(-60)
    async with start_auth(clock=ahead) as first, start_auth(clock=behind) as second:
        old_kid = (await first.jwks())[0]["kid"]

        new_kid = await _rotate(second, await second.admin())

        assert [k["kid"] for k in await second.jwks()] == [new_kid, old_kid]
        assert _kid((await second.admin()).token) == new_kid


async def test_a_second_rotation_retires_the_oldest_key(start_auth: StartAuth) -> None:
    async with start_auth() as auth:
        admin = await auth.admin()
        user = await auth.register()
        first_kid = _kid(user.token)
        second_kid = await _rotate(auth, admin)
        middle = (await auth.login(user.username, PASSWORD)).json()["token"]

        third_kid = await _rotate(auth, admin)

        assert [k["kid"] for k in await auth.jwks()] == [third_kid, second_kid]
        body = assert_error(await auth.me(user.headers), 401, "AUTH_INVALID_TOKEN")
        assert first_kid not in body["message"]
        assert (await auth.me({"Authorization": f"Bearer {middle}"})).status_code == 200


async def test_a_restart_after_rotation_keeps_both_published_keys(start_auth: StartAuth) -> None:
    async with start_auth() as before:
        user = await before.register()
        new_kid = await _rotate(before, await before.admin())

    async with start_auth() as after:
        assert [k["kid"] for k in await after.jwks()] == [new_kid, _kid(user.token)]
        assert (await after.me(user.headers)).status_code == 200


async def test_other_replicas_pick_up_a_rotation(start_auth: StartAuth) -> None:
    async with (
        start_auth(signing_key_refresh_seconds=0.02) as first,
        start_auth(signing_key_refresh_seconds=0.02) as second,
    ):
        new_kid = await _rotate(first, await first.admin())

        deadline = time.monotonic() + 5
        while (await second.jwks())[0]["kid"] != new_kid:
            assert time.monotonic() < deadline, "the second replica never saw the rotation"
            await asyncio.sleep(0.02)
        assert _kid((await second.admin()).token) == new_kid


async def test_a_key_older_than_the_rotation_period_is_replaced_at_startup(
    start_auth: StartAuth,
) -> None:
    clock = now_clock()
    async with start_auth(clock=clock, signing_key_rotation_days=30) as before:
        old_kid = (await before.jwks())[0]["kid"]

    clock.advance(31 * 24 * 3600)
    async with start_auth(clock=clock, signing_key_rotation_days=30) as after:
        keys = [k["kid"] for k in await after.jwks()]

    assert len(keys) == 2
    assert keys[1] == old_kid
    assert keys[0] != old_kid


async def test_a_token_signed_by_a_foreign_key_with_a_known_kid_is_rejected(
    auth: AuthClient,
) -> None:
    account = await auth.register()
    foreign = foreign_key()
    forged = jwt.encode(
        _claims(account, roles=["USER", "ADMIN"]),
        foreign,
        algorithm="RS256",
        headers={"kid": _kid(account.token)},
    )

    assert_error(await auth.me({"Authorization": f"Bearer {forged}"}), 401, "AUTH_INVALID_TOKEN")


async def test_an_unsigned_alg_none_token_is_rejected(auth: AuthClient) -> None:
    account = await auth.register()
    forged = jwt.encode(
        _claims(account), key="", algorithm="none", headers={"kid": _kid(account.token)}
    )

    assert_error(await auth.me({"Authorization": f"Bearer {forged}"}), 401, "AUTH_INVALID_TOKEN")


async def test_an_hs256_token_keyed_with_the_public_key_is_rejected(auth: AuthClient) -> None:
    account = await auth.register()
    key = (await auth.signing_keys())[0]
    public_pem = (
        private_key(key)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
    signing_input = f"{_b64(header)}.{_b64(_claims(account))}"
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"

    assert_error(await auth.me({"Authorization": f"Bearer {forged}"}), 401, "AUTH_INVALID_TOKEN")


def _b64(part: dict[str, Any]) -> str:
    raw = json.dumps(part, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def test_a_token_with_a_tampered_payload_is_rejected(auth: AuthClient) -> None:
    account = await auth.register()
    header, _, signature = account.token.split(".")
    forged = f"{header}.{_b64(_claims(account, roles=['USER', 'ADMIN']))}.{signature}"

    assert_error(await auth.me({"Authorization": f"Bearer {forged}"}), 401, "AUTH_INVALID_TOKEN")


async def test_an_expired_token_is_rejected_as_expired(auth: AuthClient) -> None:
    account = await auth.register()
    now = int(time.time())
    expired = await auth.sign(_claims(account, iat=now - 3700, exp=now - 100))

    body = assert_error(
        await auth.me({"Authorization": f"Bearer {expired}"}), 401, "AUTH_EXPIRED_TOKEN"
    )
    assert body["message"] == "bearer token has expired"


async def test_a_token_from_another_issuer_is_rejected(auth: AuthClient) -> None:
    account = await auth.register()
    token = await auth.sign(_claims(account, iss="someone-else"))

    assert_error(await auth.me({"Authorization": f"Bearer {token}"}), 401, "AUTH_INVALID_TOKEN")


async def test_a_token_missing_a_required_claim_is_rejected(auth: AuthClient) -> None:
    account = await auth.register()

    for claim in ("sub", "exp", "iat", "jti", "iss"):
        token = await auth.sign(_claims(account, **{claim: None}))
        response = await auth.me({"Authorization": f"Bearer {token}"})
        assert_error(response, 401, "AUTH_INVALID_TOKEN")


async def test_a_token_whose_subject_is_not_a_user_id_is_rejected(auth: AuthClient) -> None:
    account = await auth.register()
    token = await auth.sign(_claims(account, sub="alice"))

    assert_error(await auth.me({"Authorization": f"Bearer {token}"}), 401, "AUTH_INVALID_TOKEN")


async def test_a_malformed_bearer_token_is_rejected(auth: AuthClient) -> None:
    for token in ("invalid.token.here", "not-a-jwt", "a.b", "eyJhbGciOiJSUzI1NiJ9.e30.c2ln"):
        response = await auth.me({"Authorization": f"Bearer {token}"})
        assert_error(response, 401, "AUTH_INVALID_TOKEN")


async def test_an_authorization_header_that_is_not_bearer_is_rejected(auth: AuthClient) -> None:
    for value in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "Token abc"):
        response = await auth.me({"Authorization": value})
        assert_error(response, 401, "AUTH_INVALID_TOKEN")


async def test_a_request_without_credentials_is_answered_auth_invalid_key(
    auth: AuthClient,
) -> None:
    response = await auth.me({})

    body = assert_error(response, 401, "AUTH_INVALID_KEY")
    assert "missing credentials" in body["message"]
    assert "Bearer" in response.headers["www-authenticate"]
