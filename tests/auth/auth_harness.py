"""A running in-process auth service and the few calls most auth tests start from."""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from fastapi import FastAPI

from leaky_tokens.auth.app import create_auth_app
from leaky_tokens.auth.jwt_tokens import KeyMaterial
from leaky_tokens.auth.repository import AuthRepository
from leaky_tokens.auth.service import AuthService
from leaky_tokens.settings import Settings
from leaky_tokens.shared.clock import FakeClock
from tests.backends import create_postgres_database, drop_postgres_database, need_postgres

PASSWORD = "correct-horse-1"
ADMIN_USERNAME = "root-admin"
ADMIN_PASSWORD = "admin-password-1"
ERROR_KEYS = {"message", "timestamp", "code", "requestId"}


def now_clock() -> FakeClock:
    """A fake clock that starts at the wall-clock time.

    JWT expiry is checked by PyJWT against the wall clock, so tokens issued at a fake time far
    from now would be rejected; tests that move time keep within the token's life or only move
    it for things the service itself times (API-key expiry, login windows).
    """
    return FakeClock(datetime.now(UTC).replace(microsecond=0))


def unique(prefix: str = "user") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is our error body with this status and code; returns the body."""
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body.keys() >= ERROR_KEYS, body
    assert set(body) - ERROR_KEYS <= {"details", "retryAfterSeconds"}, body
    assert body["code"] == code, body
    assert isinstance(body["message"], str)
    assert body["message"]
    assert body["requestId"] == response.headers["x-request-id"]
    assert body["timestamp"].endswith("Z")
    return body


@dataclass
class Account:
    user_id: str
    username: str
    password: str
    token: str
    email: str = ""
    roles: list[str] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class AuthClient:
    http: httpx.AsyncClient
    app: FastAPI
    settings: Settings
    clock: FakeClock | None = None

    @property
    def service(self) -> AuthService:
        service: AuthService = self.app.state.auth_service
        return service

    async def register(
        self,
        username: str | None = None,
        *,
        email: str | None = None,
        password: str = PASSWORD,
    ) -> Account:
        username = username or unique()
        email = email or f"{username}@example.com"
        response = await self.http.post(
            "/api/v1/auth/register",
            json={"username": username, "email": email, "password": password},
        )
        assert response.status_code == 201, response.text
        body = response.json()
        return Account(body["userId"], username, password, body["token"], email, body["roles"])

    async def login(
        self,
        username: str,
        password: str,
        *,
        client_ip: str | None = None,
        peer: str | None = None,
    ) -> httpx.Response:
        """Log in as the gateway would forward it (X-Forwarded-For `client_ip`, from loopback),
        or straight from `peer` (an address of our choosing, not loopback)."""
        headers = {"X-Forwarded-For": client_ip} if client_ip else {}
        body = {"username": username, "password": password}
        if peer is None:
            return await self.http.post("/api/v1/auth/login", json=body, headers=headers)
        transport = httpx.ASGITransport(app=self.app, client=(peer, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as direct:
            return await direct.post("/api/v1/auth/login", json=body, headers=headers)

    async def log_in(self, username: str, password: str) -> Account:
        response = await self.login(username, password)
        assert response.status_code == 200, response.text
        body = response.json()
        return Account(body["userId"], username, password, body["token"], roles=body["roles"])

    async def admin(self) -> Account:
        """The ADMIN bootstrapped from the settings, logged in."""
        return await self.log_in(self.settings.admin_username, self.settings.admin_password)

    async def me(self, headers: dict[str, str]) -> httpx.Response:
        return await self.http.get("/api/v1/auth/me", headers=headers)

    async def create_api_key(
        self, account: Account, name: str = "cli-access", **fields: Any
    ) -> dict[str, Any]:
        response = await self.http.post(
            "/api/v1/auth/api-keys",
            json={"userId": account.user_id, "name": name, **fields},
            headers=account.headers,
        )
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def jwks(self) -> list[dict[str, Any]]:
        response = await self.http.get("/oauth2/jwks")
        assert response.status_code == 200, response.text
        keys: list[dict[str, Any]] = response.json()["keys"]
        return keys

    async def signing_keys(self) -> list[KeyMaterial]:
        """The stored signing keys, newest first (to craft tokens the service would sign)."""
        async with self.service.db.read() as session:
            return await AuthRepository(session).newest_signing_keys(10)

    async def sign(self, claims: dict[str, Any], **headers: Any) -> str:
        """A token signed with the service's own current private key, with any claims."""
        key = (await self.signing_keys())[0]
        return jwt.encode(
            claims, private_key(key), algorithm="RS256", headers={"kid": key.kid, **headers}
        )


@functools.cache
def _parsed_private_key(pem: str) -> RSAPrivateKey:
    # Our own freshly made key: skip the (slow) validation a PEM from outside would need.
    key = serialization.load_pem_private_key(
        pem.encode(), password=None, unsafe_skip_rsa_key_validation=True
    )
    assert isinstance(key, RSAPrivateKey)
    return key


def private_key(material: KeyMaterial) -> RSAPrivateKey:
    return _parsed_private_key(material.private_pem)


@functools.cache
def foreign_key() -> RSAPrivateKey:
    """An RSA key the auth service never heard of (one per run: making one takes ~0.1 s)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@asynccontextmanager
async def fresh_database(backend: str, directory: Path) -> AsyncIterator[str]:
    """An empty database of the backend ("sqlite" or "postgresql"), dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{directory / f'auth-{uuid.uuid4().hex[:8]}.db'}"
        return
    need_postgres()
    url = await create_postgres_database("auth")
    try:
        yield url
    finally:
        await drop_postgres_database(url)


@asynccontextmanager
async def running_auth(
    database_url: str,
    data_dir: Path,
    *,
    clock: FakeClock | None = None,
    redis_url: str = "",
    admin: tuple[str, str] = (ADMIN_USERNAME, ADMIN_PASSWORD),
    trusted_proxies: list[str] | None = None,
    redis: dict[str, Any] | None = None,
    **auth: Any,
) -> AsyncIterator[AuthClient]:
    """The auth service in-process (lifespan run: migrations, signing key, admin bootstrap)."""
    settings = Settings(
        **({} if trusted_proxies is None else {"trusted_proxies": trusted_proxies}),
        **({} if redis is None else {"redis": redis}),
        data_dir=data_dir,
        access_log=False,
        redis_url=redis_url,
        admin_username=admin[0],
        admin_password=admin[1],
        auth={
            "database_url": database_url,
            "argon2_time_cost": 1,
            "argon2_memory_kib": 1024,
            **auth,
        },
    )
    app = create_auth_app(settings, clock=clock)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        yield AuthClient(client, app, settings, clock)


# start_auth(clock=, redis_url=, admin=(name, password), **auth_settings) -> AuthClient context
StartAuth = Callable[..., AbstractAsyncContextManager[AuthClient]]
