"""Authentication at the edge: who may pass, and what a refused caller is told."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from leaky_tokens.shared.authn import RemoteAuthenticator
from leaky_tokens.shared.errors import (
    ExpiredApiKey,
    RevokedApiKey,
    ServiceUnavailable,
)
from tests.fake_http import Answer, fake_service
from tests.gateway.gateway_harness import Gateway, assert_error, running_gateway

ISSUER = "leaky-tokens"


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    async with running_gateway() as gateway:
        yield gateway


async def test_a_protected_route_without_credentials_is_401_and_not_forwarded(
    gw: Gateway,
) -> None:
    response = await gw.client().get("/api/v1/tokens/quota")

    assert_error(response, 401, "AUTH_INVALID_KEY")
    assert "ApiKey" in response.headers["www-authenticate"]
    assert gw.upstream.seen == []


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"X-Api-Key": "leaky_not-a-key"}, "AUTH_INVALID_KEY"),
        ({"X-Api-Key": " "}, "AUTH_INVALID_KEY"),
        ({"Authorization": "Bearer invalid.token.here"}, "AUTH_INVALID_TOKEN"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "AUTH_INVALID_TOKEN"),
        ({"Authorization": "Bearer"}, "AUTH_INVALID_TOKEN"),
    ],
)
async def test_bad_credentials_are_401_with_their_code(
    gw: Gateway, headers: dict[str, str], code: str
) -> None:
    response = await gw.client().get("/api/v1/tokens/quota", headers=headers)

    assert_error(response, 401, code)
    assert gw.upstream.seen == []


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (RevokedApiKey(), 401, "AUTH_REVOKED_KEY"),
        (ExpiredApiKey(), 401, "AUTH_EXPIRED_KEY"),
        (ServiceUnavailable("auth service unreachable"), 503, "SERVICE_UNAVAILABLE"),
    ],
)
async def test_what_the_auth_service_says_about_a_key_is_what_the_caller_hears(
    gw: Gateway, error: Exception, status: int, code: str
) -> None:
    gw.auth.keys["leaky_k"] = error

    response = await gw.client().post("/api/v1/tokens/consume", headers={"X-Api-Key": "leaky_k"})

    assert_error(response, status, code)
    assert gw.upstream.seen == []  # never "let through"


async def test_valid_credentials_pass_with_the_callers_own_credential(gw: Gateway) -> None:
    key, token = gw.auth.add_key(), gw.auth.add_token()

    by_key = await gw.client().get("/api/v1/tokens/quota", headers={"X-Api-Key": key})
    by_token = await gw.client().get(
        "/api/v1/tokens/quota", headers={"Authorization": f"Bearer {token}"}
    )

    assert by_key.status_code == by_token.status_code == 200
    assert gw.upstream.seen[0].header("x-api-key") == key
    assert gw.upstream.seen[1].header("authorization") == f"Bearer {token}"


async def test_public_routes_pass_without_credentials_and_whatever_they_say(
    gw: Gateway,
) -> None:
    gw.auth.keys["leaky_revoked"] = RevokedApiKey()
    calls = [
        ("POST", "/api/v1/auth/register", {}),
        ("POST", "/api/v1/auth/login", {}),
        ("GET", "/oauth2/jwks", {}),
        ("GET", "/api/v1/auth/jwks", {}),
        ("GET", "/api/v1/auth/health", {}),
        ("GET", "/api/v1/tokens/status", {}),
        ("GET", "/api/v1/analytics/health", {}),
        ("GET", "/api/v1/qwen/health", {}),
        # validation of a revoked key is the auth service's to answer, not the gateway's
        ("GET", "/api/v1/auth/api-keys/validate", {"X-Api-Key": "leaky_revoked"}),
        ("GET", "/api/v1/tokens/status", {"Authorization": "Bearer garbage"}),
    ]
    for method, path, headers in calls:
        response = await gw.client().request(method, path, headers=headers)
        assert response.status_code == 200, (path, response.text)

    assert len(gw.upstream.seen) == len(calls)


async def test_the_provider_fault_switch_takes_an_admin(gw: Gateway) -> None:
    user, admin = gw.auth.add_key(), gw.auth.add_key(admin=True)
    faults = {"failureRate": 1.0}

    refused = await gw.client().put(
        "/api/v1/openai/faults", json=faults, headers={"X-Api-Key": user}
    )
    allowed = await gw.client().put(
        "/api/v1/openai/faults", json=faults, headers={"X-Api-Key": admin}
    )

    assert_error(refused, 403, "FORBIDDEN")
    assert allowed.status_code == 200
    assert len(gw.upstream.seen) == 1


async def test_a_spoofed_identity_header_is_no_identity(gw: Gateway) -> None:
    admin_id = str(uuid.uuid4())
    response = await gw.client().get(
        "/api/v1/tokens/quota",
        headers={"X-User-Id": admin_id, "X-Authenticated-User": admin_id, "X-Roles": "ADMIN"},
    )

    assert_error(response, 401, "AUTH_INVALID_KEY")
    assert gw.upstream.seen == []


# -- real JWTs ------------------------------------------------------------------------------


def _rsa() -> RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def keys() -> tuple[RSAPrivateKey, RSAPrivateKey]:
    """(the auth service's published key, a key nobody published)."""
    return _rsa(), _rsa()


def _jwks(key: RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {"keys": [{**jwk, "kid": kid, "alg": "RS256", "use": "sig"}]}


def _token(key: RSAPrivateKey, kid: str, **claims: Any) -> str:
    now = int(time.time())
    body = {
        "sub": str(uuid.uuid4()),
        "roles": ["USER"],
        "iss": ISSUER,
        "iat": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
    } | claims
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})


@pytest.fixture
async def jwt_gateway(keys: tuple[RSAPrivateKey, RSAPrivateKey]) -> AsyncIterator[Gateway]:
    published, _ = keys

    async with fake_service(lambda _: Answer(200, _jwks(published, "kid-1"))) as (url, auth):
        authenticator = RemoteAuthenticator(url, issuer=ISSUER)
        async with running_gateway(authenticator=authenticator) as gateway:
            gateway.jwks_calls = auth.paths  # type: ignore[attr-defined]  (a live list)
            yield gateway


async def test_a_token_signed_by_the_published_key_passes(
    jwt_gateway: Gateway, keys: tuple[RSAPrivateKey, RSAPrivateKey]
) -> None:
    token = _token(keys[0], "kid-1")

    for _ in range(3):
        response = await jwt_gateway.client().get(
            "/api/v1/tokens/quota", headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 200

    assert jwt_gateway.jwks_calls == ["/oauth2/jwks"]  # type: ignore[attr-defined]


async def test_a_token_signed_by_another_key_is_refused(
    jwt_gateway: Gateway, keys: tuple[RSAPrivateKey, RSAPrivateKey]
) -> None:
    good = _token(keys[0], "kid-1")
    await jwt_gateway.client().get(
        "/api/v1/tokens/quota", headers={"Authorization": f"Bearer {good}"}
    )
    forged = [
        _token(keys[1], "kid-1"),  # the published kid, another key's signature
        _token(keys[1], "kid-unknown"),
        _token(keys[0], "kid-1", roles=["ADMIN"])[:-4] + "AAAA",  # tampered signature
        jwt.encode({"sub": str(uuid.uuid4()), "iss": ISSUER}, "k" * 32, algorithm="HS256"),
    ]

    for token in forged:
        response = await jwt_gateway.client().get(
            "/api/v1/tokens/quota", headers={"Authorization": f"Bearer {token}"}
        )
        assert_error(response, 401, "AUTH_INVALID_TOKEN")
    assert len(jwt_gateway.upstream.seen) == 1


async def test_an_expired_token_is_refused_as_expired(
    jwt_gateway: Gateway, keys: tuple[RSAPrivateKey, RSAPrivateKey]
) -> None:
    now = int(time.time())
    expired = _token(keys[0], "kid-1", iat=now - 700, exp=now - 60)

    response = await jwt_gateway.client().get(
        "/api/v1/tokens/quota", headers={"Authorization": f"Bearer {expired}"}
    )

    assert_error(response, 401, "AUTH_EXPIRED_TOKEN")
    assert jwt_gateway.upstream.seen == []
