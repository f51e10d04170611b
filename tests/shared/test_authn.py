"""RemoteAuthenticator and the `authenticate` dependency, against a real in-process auth service
served on a loopback port (behind a Gate that records paths and can go down), over real HTTP.

The auth service's database backend is not what is under test here, so it runs on SQLite only.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio
from fastapi import FastAPI

from leaky_tokens.shared.app import build_service_app
from leaky_tokens.shared.authn import CurrentPrincipal, RemoteAuthenticator
from leaky_tokens.shared.clock import FakeClock
from leaky_tokens.shared.errors import (
    AppError,
    ExpiredApiKey,
    ExpiredToken,
    InvalidApiKey,
    InvalidToken,
    RevokedApiKey,
    ServiceUnavailable,
)
from leaky_tokens.shared.principal import Principal
from tests.auth.auth_harness import (
    Account,
    AuthClient,
    foreign_key,
    fresh_database,
    private_key,
    running_auth,
)
from tests.fake_http import Answer, Gate, fake_service, gated
from tests.live_server import closed_port, serving

pytestmark = pytest.mark.asyncio(loop_scope="module")

VALIDATE = "/api/v1/auth/api-keys/validate"
JWKS = "/oauth2/jwks"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def auth(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AuthClient]:
    directory = tmp_path_factory.mktemp("authn")
    async with fresh_database("sqlite", directory) as url, running_auth(url, directory) as client:
        yield client


Connect = Callable[..., AbstractAsyncContextManager[tuple[RemoteAuthenticator, Gate]]]


def _connector(auth: AuthClient) -> Connect:
    @asynccontextmanager
    async def connect(**options: Any) -> AsyncIterator[tuple[RemoteAuthenticator, Gate]]:
        async with gated(auth.app) as (url, gate):
            token = auth.app.state.internal_token
            authenticator = RemoteAuthenticator(
                url, issuer="leaky-tokens", **({"internal_token": token} | options)
            )
            try:
                yield authenticator, gate
            finally:
                await authenticator.aclose()

    return connect


@pytest.fixture
def connect(auth: AuthClient) -> Connect:
    """connect(**RemoteAuthenticator options) -> (authenticator, recording transport)."""
    return _connector(auth)


def _claims(account: Account, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "sub": account.user_id,
        "roles": ["USER"],
        "iss": "leaky-tokens",
        "iat": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
    } | overrides


async def test_a_bearer_token_is_verified_with_the_published_keys(
    auth: AuthClient, connect: Connect
) -> None:
    account = await auth.register()

    async with connect() as (authenticator, transport):
        first = await authenticator.from_bearer(account.token)
        second = await authenticator.from_bearer(account.token)

    assert first == second
    assert first.user_id == uuid.UUID(account.user_id)
    assert first.roles == frozenset({"USER"})
    assert first.username == account.username
    assert first.method == "jwt"
    assert transport.paths == [JWKS]  # keys are fetched once and kept


async def test_an_unknown_kid_refetches_the_keys_at_most_once_per_interval(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    async with (
        fresh_database("sqlite", tmp_path) as url,
        running_auth(url, tmp_path) as auth,
        _connector(auth)(jwks_min_refresh_seconds=5, clock=clock) as (authenticator, transport),
    ):
        admin = await auth.admin()
        await authenticator.from_bearer(admin.token)
        rotated = await auth.http.post(
            "/api/v1/auth/admin/signing-keys/rotate", headers=admin.headers
        )
        assert rotated.status_code == 200, rotated.text
        fresh = await auth.admin()

        # Within the interval an unknown kid is not worth another fetch...
        with pytest.raises(InvalidToken):
            await authenticator.from_bearer(fresh.token)
        assert transport.paths == [JWKS]

        # ...after it, the first unknown kid fetches once and the rotation is picked up.
        clock.advance(5)
        principal = await authenticator.from_bearer(fresh.token)
        for _ in range(3):
            await authenticator.from_bearer(fresh.token)
            await authenticator.from_bearer(admin.token)  # the previous key still verifies

    assert principal.user_id == uuid.UUID(admin.user_id)
    assert transport.paths == [JWKS, JWKS]


async def test_forged_kids_cannot_make_every_request_call_the_auth_service(
    auth: AuthClient, connect: Connect
) -> None:
    account = await auth.register()
    key = (await auth.signing_keys())[0]

    async with connect(jwks_min_refresh_seconds=60, clock=FakeClock()) as (
        authenticator,
        transport,
    ):
        for _ in range(10):
            forged = jwt.encode(
                _claims(account), private_key(key), algorithm="RS256", headers={"kid": "made-up"}
            )
            with pytest.raises(InvalidToken):
                await authenticator.from_bearer(forged)

    assert transport.paths == [JWKS]


async def test_forged_and_malformed_tokens_are_invalid(auth: AuthClient, connect: Connect) -> None:
    account = await auth.register()
    kid = jwt.get_unverified_header(account.token)["kid"]
    foreign = foreign_key()
    header, _, signature = account.token.split(".")
    admin_claims = jwt.encode(_claims(account, roles=["ADMIN"]), "k" * 32, algorithm="HS256")
    tokens = [
        jwt.encode(_claims(account), foreign, algorithm="RS256", headers={"kid": kid}),
        jwt.encode(_claims(account), "", algorithm="none", headers={"kid": kid}),
        jwt.encode(_claims(account), "k" * 32, algorithm="HS256", headers={"kid": kid}),
        f"{header}.{admin_claims.split('.')[1]}.{signature}",
        await auth.sign(_claims(account, iss="someone-else")),
        await auth.sign({k: v for k, v in _claims(account).items() if k != "jti"}),
        "invalid.token.here",
        "",
    ]

    async with connect() as (authenticator, _):
        for token in tokens:
            with pytest.raises(InvalidToken):
                await authenticator.from_bearer(token)


async def test_an_expired_token_is_expired(auth: AuthClient, connect: Connect) -> None:
    account = await auth.register()
    now = int(time.time())
    expired = await auth.sign(_claims(account, iat=now - 700, exp=now - 60))

    async with connect() as (authenticator, _):
        with pytest.raises(ExpiredToken) as caught:
            await authenticator.from_bearer(expired)

    assert caught.value.status == 401
    assert caught.value.code == "AUTH_EXPIRED_TOKEN"


async def test_an_api_key_is_validated_by_the_auth_service(
    auth: AuthClient, connect: Connect
) -> None:
    account = await auth.register()
    key = await auth.create_api_key(account)

    async with connect() as (authenticator, transport):
        principal = await authenticator.from_api_key(key["rawKey"])

    assert principal == Principal(
        user_id=uuid.UUID(account.user_id),
        roles=frozenset({"USER"}),
        org_ids=frozenset(),
        method="api_key",
        api_key_id=uuid.UUID(key["id"]),
        username=account.username,
        issued_seq=principal.issued_seq,  # the feed's cursor when it was answered
    )
    assert isinstance(principal.issued_seq, int)
    assert transport.paths == [VALIDATE]


async def test_an_api_key_answer_is_cached_for_the_configured_time(
    auth: AuthClient, connect: Connect
) -> None:
    account = await auth.register()
    raw = (await auth.create_api_key(account))["rawKey"]
    clock = FakeClock()

    async with connect(api_key_cache_seconds=30, clock=clock) as (authenticator, transport):
        for _ in range(5):
            await authenticator.from_api_key(raw)
        assert transport.paths == [VALIDATE]

        clock.advance(29.9)
        await authenticator.from_api_key(raw)
        assert transport.paths == [VALIDATE]

        clock.advance(0.1)
        await authenticator.from_api_key(raw)
        assert transport.paths == [VALIDATE, VALIDATE]


async def test_a_revoked_key_is_rejected_once_its_cached_answer_expires(
    auth: AuthClient, connect: Connect
) -> None:
    account = await auth.register()
    key = await auth.create_api_key(account)
    clock = FakeClock()

    async with connect(api_key_cache_seconds=10, clock=clock) as (authenticator, _):
        await authenticator.from_api_key(key["rawKey"])
        revoked = await auth.http.delete(
            f"/api/v1/auth/api-keys/{key['id']}", headers=account.headers
        )
        assert revoked.status_code == 204

        await authenticator.from_api_key(key["rawKey"])  # the cached answer, for now
        clock.advance(10)
        with pytest.raises(RevokedApiKey):
            await authenticator.from_api_key(key["rawKey"])


async def test_without_a_cache_a_revoked_key_is_rejected_at_once(
    auth: AuthClient, connect: Connect
) -> None:
    account = await auth.register()
    key = await auth.create_api_key(account)

    async with connect(api_key_cache_seconds=0) as (authenticator, transport):
        await authenticator.from_api_key(key["rawKey"])
        await auth.http.delete(f"/api/v1/auth/api-keys/{key['id']}", headers=account.headers)

        with pytest.raises(RevokedApiKey):
            await authenticator.from_api_key(key["rawKey"])

    assert transport.paths == [VALIDATE, VALIDATE]


async def test_forgetting_a_key_drops_its_cached_answer(auth: AuthClient, connect: Connect) -> None:
    account = await auth.register()
    key = await auth.create_api_key(account)

    async with connect(api_key_cache_seconds=300) as (authenticator, _):
        await authenticator.from_api_key(key["rawKey"])
        await auth.http.delete(f"/api/v1/auth/api-keys/{key['id']}", headers=account.headers)

        authenticator.forget_api_key(key["rawKey"])

        with pytest.raises(RevokedApiKey):
            await authenticator.from_api_key(key["rawKey"])


async def test_an_unknown_key_is_invalid_and_not_cached(auth: AuthClient, connect: Connect) -> None:
    async with connect(api_key_cache_seconds=300) as (authenticator, transport):
        for _ in range(2):
            with pytest.raises(InvalidApiKey):
                await authenticator.from_api_key(f"leaky_{uuid.uuid4()}_{'0' * 48}")

    assert transport.paths == [VALIDATE, VALIDATE]


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (401, {"code": "AUTH_INVALID_KEY"}, InvalidApiKey),
        (401, {"code": "AUTH_REVOKED_KEY"}, RevokedApiKey),
        (401, {"code": "AUTH_EXPIRED_KEY"}, ExpiredApiKey),
        (401, {"code": "SOMETHING_NEW"}, InvalidApiKey),
        (401, "not json", InvalidApiKey),
        (500, {"code": "INTERNAL_ERROR"}, ServiceUnavailable),
        (429, {"code": "RATE_LIMITED"}, ServiceUnavailable),
        (200, "<html>not our service</html>", ServiceUnavailable),
        (200, {"unexpected": "shape"}, ServiceUnavailable),
    ],
)
async def test_the_auth_services_answers_map_to_our_errors(
    status: int, body: object, error: type[AppError]
) -> None:
    async with fake_service(lambda _: Answer(status, body)) as (url, _):
        authenticator = RemoteAuthenticator(url, issuer="leaky-tokens")
        try:
            with pytest.raises(error):
                await authenticator.from_api_key("leaky_whatever")
        finally:
            await authenticator.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        Answer(500, {"code": "INTERNAL_ERROR"}),
        Answer(200, "<html>not our service</html>"),
        Answer(200, {"no": "keys"}),
        Answer(200, {"keys": [{"kid": "k1", "kty": "RSA"}]}),
    ],
    ids=["500", "html", "no-keys", "broken-jwk"],
)
async def test_an_unusable_key_set_is_service_unavailable(auth: AuthClient, answer: Answer) -> None:
    account = await auth.register()
    async with fake_service(lambda _: answer) as (url, _):
        authenticator = RemoteAuthenticator(url, issuer="leaky-tokens")
        try:
            with pytest.raises(ServiceUnavailable):
                await authenticator.from_bearer(account.token)
        finally:
            await authenticator.aclose()


async def test_a_closed_port_is_unavailable_and_the_error_names_no_url(auth: AuthClient) -> None:
    account = await auth.register()
    url = f"http://127.0.0.1:{closed_port()}"
    authenticator = RemoteAuthenticator(url, issuer="leaky-tokens", timeout_seconds=1)
    try:
        with pytest.raises(ServiceUnavailable) as for_key:
            await authenticator.from_api_key("leaky_whatever")
        with pytest.raises(ServiceUnavailable) as for_token:
            await authenticator.from_bearer(account.token)
    finally:
        await authenticator.aclose()

    for error in (for_key.value, for_token.value):
        assert "127.0.0.1" not in error.message
        assert "127.0.0.1" not in str(error.__cause__)


async def test_an_unreachable_auth_service_is_unavailable_never_a_pass(
    auth: AuthClient, connect: Connect
) -> None:
    account = await auth.register()
    raw = (await auth.create_api_key(account))["rawKey"]

    async with connect() as (authenticator, transport):
        transport.down = True  # (the gate answers 503)

        with pytest.raises(ServiceUnavailable) as for_key:
            await authenticator.from_api_key(raw)
        with pytest.raises(ServiceUnavailable) as for_token:
            await authenticator.from_bearer(account.token)

    assert for_key.value.status == for_token.value.status == 503
    assert for_key.value.code == "SERVICE_UNAVAILABLE"


async def test_known_keys_keep_verifying_tokens_while_the_auth_service_is_down(
    auth: AuthClient, connect: Connect
) -> None:
    account = await auth.register()

    async with connect() as (authenticator, transport):
        await authenticator.from_bearer(account.token)
        transport.down = True  # (the gate answers 503)

        principal = await authenticator.from_bearer(account.token)

    assert principal.user_id == uuid.UUID(account.user_id)


def _protected_app(authenticator: RemoteAuthenticator) -> FastAPI:
    """Another service's app: one route behind the shared `authenticate` dependency."""
    from fastapi import APIRouter

    router = APIRouter()

    @router.get("/whoami")
    async def whoami(principal: CurrentPrincipal) -> dict[str, Any]:
        return {"userId": str(principal.user_id), "method": principal.method}

    app = build_service_app("tokens", title="protected", routers=[router], log_access=False)
    app.state.authenticator = authenticator
    return app


async def test_another_service_accepts_tokens_and_keys_and_answers_errors_in_our_shape(
    auth: AuthClient, connect: Connect
) -> None:
    account = await auth.register()
    raw = (await auth.create_api_key(account))["rawKey"]

    async with (
        connect(api_key_cache_seconds=0) as (authenticator, transport),
        serving(_protected_app(authenticator)) as service_url,
        httpx.AsyncClient(base_url=service_url) as service,
    ):
        by_token = await service.get("/whoami", headers=account.headers)
        by_key = await service.get("/whoami", headers={"X-Api-Key": raw})
        anonymous = await service.get("/whoami")
        garbage = await service.get(
            "/whoami", headers={"Authorization": "Bearer invalid.token.here"}
        )
        transport.down = True  # (the gate answers 503)
        auth_down = await service.get("/whoami", headers={"X-Api-Key": raw})

    assert by_token.json() == {"userId": account.user_id, "method": "jwt"}
    assert by_key.json() == {"userId": account.user_id, "method": "api_key"}
    for response, status, code in (
        (anonymous, 401, "AUTH_INVALID_KEY"),
        (garbage, 401, "AUTH_INVALID_TOKEN"),
        (auth_down, 503, "SERVICE_UNAVAILABLE"),
    ):
        assert response.status_code == status, response.text
        body = response.json()
        assert body["code"] == code
        assert body["requestId"] == response.headers["x-request-id"]
        assert set(body) == {"message", "timestamp", "code", "requestId"}
