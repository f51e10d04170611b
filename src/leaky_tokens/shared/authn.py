"""Authenticating callers in every service: Bearer JWTs and X-Api-Key, as a FastAPI dependency.

The auth service verifies locally; the other services use `RemoteAuthenticator`, which checks JWTs
against the auth service's JWKS (cached by kid, refetched on an unknown kid at most every few
seconds) and asks the auth service to validate API keys (cached briefly).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated, Any, Protocol

import httpx
import jwt
from fastapi import Depends, Request

from leaky_tokens.shared.clock import Clock, SystemClock
from leaky_tokens.shared.errors import (
    AppError,
    ExpiredApiKey,
    InvalidApiKey,
    InvalidToken,
    RevokedApiKey,
    ServiceUnavailable,
)
from leaky_tokens.shared.jwt_verify import (
    decode_token,
    principal_from_claims,
    public_key_from_jwk,
    unverified_kid,
)
from leaky_tokens.shared.principal import Principal


class Authenticator(Protocol):
    async def from_bearer(self, token: str) -> Principal: ...

    async def from_api_key(self, raw_key: str) -> Principal: ...


def credentials_of(request: Request) -> tuple[str, str] | None:
    """("api_key", key) or ("bearer", token) from the headers; None when neither is sent."""
    api_key = request.headers.get("x-api-key")
    if api_key is not None:
        if not api_key.strip():
            raise InvalidApiKey("empty X-Api-Key header")
        return "api_key", api_key.strip()
    authorization = request.headers.get("authorization")
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidToken("Authorization header must be 'Bearer <token>'")
    return "bearer", token.strip()


async def authenticate(request: Request) -> Principal:
    found = credentials_of(request)
    if found is None:
        # The regression contract: no credentials at all answers AUTH_INVALID_KEY.
        raise InvalidApiKey(
            "missing credentials: send Authorization: Bearer <jwt> or X-Api-Key",
            headers={"WWW-Authenticate": 'Bearer, ApiKey header="X-Api-Key"'},
        )
    authenticator: Authenticator = request.app.state.authenticator
    kind, value = found
    if kind == "api_key":
        return await authenticator.from_api_key(value)
    return await authenticator.from_bearer(value)


CurrentPrincipal = Annotated[Principal, Depends(authenticate)]

_KEY_ERRORS: dict[str, type[AppError]] = {
    "AUTH_INVALID_KEY": InvalidApiKey,
    "AUTH_REVOKED_KEY": RevokedApiKey,
    "AUTH_EXPIRED_KEY": ExpiredApiKey,
}


class RemoteAuthenticator:
    """Verifies callers for a service that is not the auth service."""

    def __init__(
        self,
        auth_url: str,
        *,
        issuer: str,
        api_key_cache_seconds: float = 2.0,
        jwks_min_refresh_seconds: float = 5.0,
        timeout_seconds: float = 3.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._clock = clock or SystemClock()
        self._client = httpx.AsyncClient(
            base_url=auth_url, timeout=timeout_seconds, transport=transport
        )
        self._issuer = issuer
        self._keys: dict[str, Any] = {}
        self._jwks_fetched_at = float("-inf")
        self._jwks_lock = asyncio.Lock()
        self._min_refresh = jwks_min_refresh_seconds
        self._key_cache: dict[str, tuple[float, Principal]] = {}
        self._key_ttl = api_key_cache_seconds

    async def aclose(self) -> None:
        await self._client.aclose()

    async def from_bearer(self, token: str) -> Principal:
        kid = unverified_kid(token)
        key = self._keys.get(kid)
        if key is None:
            await self._refresh_jwks()
            key = self._keys.get(kid)
            if key is None:
                raise InvalidToken("bearer token signed by an unknown key")
        return principal_from_claims(decode_token(token, key, self._issuer))

    async def _refresh_jwks(self) -> None:
        async with self._jwks_lock:
            # An unknown kid triggers at most one fetch per interval, so forged kids can't
            # turn every request into a call to the auth service.
            if self._clock.monotonic() - self._jwks_fetched_at < self._min_refresh:
                return
            try:
                response = await self._client.get("/oauth2/jwks")
                response.raise_for_status()
                keys = response.json()["keys"]
                # An answer we cannot read is an unavailable auth service, not a 500.
                found = {k["kid"]: public_key_from_jwk(k) for k in keys if "kid" in k}
            except (httpx.HTTPError, KeyError, ValueError, TypeError, jwt.PyJWTError) as exc:
                raise ServiceUnavailable("auth service unreachable for key lookup") from exc
            self._keys = found
            self._jwks_fetched_at = self._clock.monotonic()

    def forget_api_key(self, raw_key: str | None = None) -> None:
        """Drop cached API-key answers (all of them when no key is named)."""
        if raw_key is None:
            self._key_cache.clear()
        else:
            self._key_cache.pop(raw_key, None)

    async def from_api_key(self, raw_key: str) -> Principal:
        now = self._clock.monotonic()
        cached = self._key_cache.get(raw_key)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            response = await self._client.get(
                "/api/v1/auth/api-keys/validate", headers={"X-Api-Key": raw_key}
            )
        except httpx.HTTPError as exc:
            raise ServiceUnavailable("auth service unreachable for API key validation") from exc
        if response.status_code == 401:
            code = _safe_code(response)
            raise _KEY_ERRORS.get(code, InvalidApiKey)()
        if response.status_code != 200:
            raise ServiceUnavailable("auth service could not validate the API key")
        try:
            principal = principal_from_validation(response.json())
        except (KeyError, ValueError, TypeError) as exc:  # not an answer our auth service gives
            raise ServiceUnavailable("auth service gave an unreadable API key answer") from exc
        if self._key_ttl > 0:
            if len(self._key_cache) > 100_000:
                self._key_cache.clear()
            self._key_cache[raw_key] = (now + self._key_ttl, principal)
        return principal


def principal_from_validation(body: dict[str, Any]) -> Principal:
    return Principal(
        user_id=uuid.UUID(body["userId"]),
        roles=frozenset(body.get("roles", [])),
        org_ids=frozenset(uuid.UUID(o) for o in body.get("orgIds", [])),
        method="api_key",
        api_key_id=uuid.UUID(body["apiKeyId"]) if body.get("apiKeyId") else None,
        username=body.get("username"),
    )


def _safe_code(response: httpx.Response) -> str:
    try:
        return str(response.json().get("code", ""))
    except ValueError:
        return ""
