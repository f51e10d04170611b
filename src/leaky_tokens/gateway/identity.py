"""Who is calling, as the edge sees it: the shared authenticator plus a short memory of bearer
tokens it has already verified and of API keys the auth service refused.

An unknown (or revoked, or expired) key is remembered for `negative_seconds`: a client
repeating a junk key costs the auth service one call, not one per request. A key that is
refused now cannot become valid later (keys are random and shown once, after they are stored),
so nothing good is ever refused from this memory.

Verifying an RS256 signature costs about as much as the rest of the gateway's work on a
request, and a client sends the same token again and again. A verified token is remembered
until it expires, and at most `remember_seconds` (so a signing key that leaves the published
set stops being honoured here soon after, as at the upstreams). The upstream verifies the token
itself anyway; this only spares the gateway's own check.
"""

from __future__ import annotations

from typing import Any

import jwt

from leaky_tokens.shared.authn import Authenticator, is_api_key
from leaky_tokens.shared.clock import Clock, SystemClock
from leaky_tokens.shared.errors import (
    ExpiredApiKey,
    InvalidApiKey,
    RevokedApiKey,
    Unauthenticated,
)
from leaky_tokens.shared.principal import Principal

_REFUSED = (InvalidApiKey, RevokedApiKey, ExpiredApiKey)


class EdgeAuthenticator:
    def __init__(
        self,
        inner: Authenticator,
        *,
        clock: Clock | None = None,
        remember_seconds: float = 60.0,
        max_tokens: int = 50_000,
        negative_seconds: float = 5.0,
    ) -> None:
        self.inner = inner
        self._clock = clock or SystemClock()
        self._remember = remember_seconds
        self._max = max_tokens
        self._verified: dict[str, tuple[float, Principal]] = {}  # token -> (good until, who)
        self._negative = negative_seconds
        # raw key -> (refused until (monotonic), the error's class, its message)
        self._refused: dict[str, tuple[float, type[Unauthenticated], str]] = {}

    async def from_api_key(self, raw_key: str) -> Principal:
        refused = self._refused.get(raw_key)
        if refused is not None:
            if refused[0] > self._clock.monotonic():
                raise refused[1](refused[2])
            del self._refused[raw_key]
        try:
            return await self.inner.from_api_key(raw_key)  # cached (until revoked) inside
        except _REFUSED as exc:
            if self._negative > 0:
                if len(self._refused) >= self._max:
                    self._refused.clear()
                until = self._clock.monotonic() + self._negative
                self._refused[raw_key] = (until, type(exc), exc.message)
            raise

    async def from_bearer(self, token: str) -> Principal:
        if is_api_key(token):  # `Authorization: Bearer <API key>`, as OpenAI's SDKs send it
            return await self.from_api_key(token)
        now = self._clock.now().timestamp()
        known = self._verified.get(token)
        if known is not None:
            if known[0] > now:
                # A remembered token is still checked against principal changes (membership,
                # roles, revoked sessions): one in-memory lookup.
                check = getattr(self.inner, "check_principal", None)
                if check is not None:
                    check(known[1])
                return known[1]
            del self._verified[token]
        principal = await self.inner.from_bearer(token)  # raises for bad or expired tokens
        if self._remember > 0:
            expires = _expiry(token)
            until = min(now + self._remember, expires if expires is not None else now)
            if until > now:
                if len(self._verified) >= self._max:
                    self._verified.clear()
                self._verified[token] = (until, principal)
        return principal

    async def aclose(self) -> None:
        self._verified.clear()
        self._refused.clear()
        aclose: Any = getattr(self.inner, "aclose", None)
        if aclose is not None:
            await aclose()


def _expiry(token: str) -> float | None:
    """The `exp` of a token whose signature was just verified."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
        return float(claims["exp"])
    except (jwt.PyJWTError, KeyError, TypeError, ValueError):
        return None
