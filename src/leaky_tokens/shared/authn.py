"""Authenticating callers in every service: Bearer JWTs and X-Api-Key, as a FastAPI dependency.

The auth service verifies locally; the other services use `RemoteAuthenticator`, which checks JWTs
against the auth service's JWKS (cached by kid, refetched on an unknown kid at most every few
seconds) and asks the auth service to validate API keys (cached briefly).

Revocation is an event, not a cache expiry: a `RemoteAuthenticator` that follows revocations
long-polls the auth service's revocation feed (`GET /api/v1/auth/api-keys/revocations?after=N
&wait=S`, answered the moment a revocation commits) or, with Redis, hears each revocation on a
pub/sub channel and reads the feed every few seconds for anything missed; either way it drops
the cached answers of revoked keys at once. While it cannot follow the feed it caches nothing,
so a revocation it missed cannot outlive a request.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime
from typing import Annotated, Any, Protocol

import aiohttp
import jwt
import orjson
from fastapi import Depends, Request
from redis.asyncio import Redis

from leaky_tokens.shared.clock import Clock, SystemClock
from leaky_tokens.shared.errors import (
    AppError,
    ExpiredApiKey,
    InvalidApiKey,
    InvalidToken,
    RevokedApiKey,
    RevokedToken,
    ServiceUnavailable,
)
from leaky_tokens.shared.events import INTERNAL_TOKEN_HEADER
from leaky_tokens.shared.jwt_verify import (
    decode_token,
    principal_from_claims,
    public_key_from_jwk,
    unverified_kid,
)
from leaky_tokens.shared.outbound import OutboundError, OutboundResponse, client_session, fetch
from leaky_tokens.shared.principal import Principal
from leaky_tokens.shared.principal_feed import PrincipalChange, PrincipalChanges
from leaky_tokens.shared.redis import redis_client

log = logging.getLogger("leaky_tokens.authn")

REVOCATION_CHANNEL = "lt:auth:api-key-revocations"
REVOCATION_FEED = "/api/v1/auth/api-keys/revocations"
# With pub/sub the feed is still read this often, for anything published while unsubscribed.
_PUSHED_FEED_CHECK_SECONDS = 5.0
# How long one long poll of the feed may wait for news (short: it holds a request open, and a
# server shutting down waits for open requests).
_FEED_WAIT_SECONDS = 2.0
_RECENT_REVOCATIONS = 10_000


async def announce_revocation(redis: Redis, seq: int, key_id: uuid.UUID) -> None:
    """Publish a committed revocation to every follower subscribed to Redis."""
    await redis.publish(REVOCATION_CHANNEL, orjson.dumps({"seq": seq, "apiKeyId": str(key_id)}))


async def announce_principal_change(redis: Redis, seq: int, kind: str) -> None:
    """Tell every follower subscribed to Redis that the feed has a principal change: they read
    the feed at once (the message names no one)."""
    await redis.publish(REVOCATION_CHANNEL, orjson.dumps({"seq": seq, "kind": kind}))


class Authenticator(Protocol):
    async def from_bearer(self, token: str) -> Principal: ...

    async def from_api_key(self, raw_key: str) -> Principal: ...


# API keys are `leaky_<userId>_<48 hex>` (auth/api_keys.py); JWTs never start so.
API_KEY_PREFIX = "leaky_"


def is_api_key(token: str) -> bool:
    """Whether a Bearer credential is one of our API keys (OpenAI's SDKs send the key as
    `Authorization: Bearer <key>`), not a JWT."""
    return token.startswith(API_KEY_PREFIX)


def credentials_of(request: Request) -> tuple[str, str] | None:
    """("api_key", key) or ("bearer", token) from the headers; None when neither is sent. An
    API key sent as `Authorization: Bearer` counts as an API key."""
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
    token = token.strip()
    return ("api_key" if is_api_key(token) else "bearer"), token


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
        clock: Clock | None = None,
        revocation_poll_seconds: float | None = None,
        redis_url: str = "",
        internal_token: str = "",
        feed_grace_seconds: float = 10.0,
    ) -> None:
        """`revocation_poll_seconds` set: follow the revocation feed (and, with `redis_url`,
        the pub/sub channel), so revoked keys and changed principals are refused within a
        second; None: cached key answers simply expire after their time and bearer tokens are
        checked by signature only. While the feed cannot be read, bearer tokens are still
        accepted against the changes known for `feed_grace_seconds`, then refused (503)."""
        self._clock = clock or SystemClock()
        self._auth_url = auth_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None  # opened on first use, in the loop
        self._timeout = timeout_seconds
        self._issuer = issuer
        self._keys: dict[str, Any] = {}
        self._jwks_fetched_at = float("-inf")
        self._jwks_lock = asyncio.Lock()
        self._min_refresh = jwks_min_refresh_seconds
        self._key_cache: dict[str, tuple[float, Principal]] = {}
        self._key_ttl = api_key_cache_seconds
        self._poll = revocation_poll_seconds
        self._redis_url = redis_url
        # The feed is internal: it is read with the shared internal token.
        self._feed_headers = {INTERNAL_TOKEN_HEADER: internal_token} if internal_token else {}
        self._cursor = 0
        self._follower: asyncio.Task[None] | None = None
        self._follow_lock = asyncio.Lock()
        self._following = False  # the feed is being followed: cached answers are safe
        self._raw_by_key_id: dict[uuid.UUID, str] = {}
        self._recently_revoked: dict[uuid.UUID, None] = {}
        self._validating: dict[str, asyncio.Future[Principal]] = {}
        self.changes = PrincipalChanges()
        self._feed_read_at = float("-inf")  # monotonic time of the last good read of the feed
        self._grace = feed_grace_seconds

    async def aclose(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            try:
                await self._follower
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: S110 - its failures were logged where they happened
                pass
            self._follower = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get(
        self,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        timeout_seconds: float | None = None,
    ) -> OutboundResponse:
        if self._session is None:
            self._session = client_session(max_connections=32, connect_seconds=self._timeout)
        return await fetch(
            self._session,
            "GET",
            self._auth_url + path,
            timeout_seconds=timeout_seconds or self._timeout,
            headers=headers,
            params=params,
        )

    async def from_bearer(self, token: str) -> Principal:
        kid = unverified_kid(token)
        key = self._keys.get(kid)
        if key is None:
            await self._refresh_jwks()
            key = self._keys.get(kid)
            if key is None:
                raise InvalidToken("bearer token signed by an unknown key")
        principal = principal_from_claims(decode_token(token, key, self._issuer))
        if self._poll is not None and self._follower is None:
            await self._start_following()
        self.check_principal(principal)
        return principal

    def check_principal(self, principal: Principal) -> None:
        """Refuse a bearer principal issued before a change about its user or organisations
        (RevokedToken); one in-memory lookup, so callers that remember verified tokens (the
        gateway) call it on every request."""
        if self._poll is None:
            return
        if self.changes.is_stale(principal):
            raise RevokedToken()
        if not self._following and self._clock.monotonic() - self._feed_read_at > self._grace:
            raise ServiceUnavailable("auth service unreachable: cannot confirm the session")

    async def _refresh_jwks(self) -> None:
        async with self._jwks_lock:
            # An unknown kid triggers at most one fetch per interval, so forged kids can't
            # turn every request into a call to the auth service.
            if self._clock.monotonic() - self._jwks_fetched_at < self._min_refresh:
                return
            try:
                response = await self._get("/oauth2/jwks")
                if response.status != 200:
                    raise ValueError(f"JWKS answered {response.status}")
                keys = orjson.loads(response.body)["keys"]
                # An answer we cannot read is an unavailable auth service, not a 500.
                found = {k["kid"]: public_key_from_jwk(k) for k in keys if "kid" in k}
            except (OutboundError, KeyError, ValueError, TypeError, jwt.PyJWTError) as exc:
                raise ServiceUnavailable("auth service unreachable for key lookup") from exc
            self._keys = found
            self._jwks_fetched_at = self._clock.monotonic()

    def forget_api_key(self, raw_key: str | None = None) -> None:
        """Drop cached API-key answers (all of them when no key is named)."""
        if raw_key is None:
            self._key_cache.clear()
            self._raw_by_key_id.clear()
        else:
            self._key_cache.pop(raw_key, None)

    def forget_revoked(self, key_ids: list[uuid.UUID]) -> None:
        """Drop the cached answers of these revoked keys, and refuse answers for them that were
        already on their way from the auth service when the revocation arrived."""
        for key_id in key_ids:
            self._recently_revoked[key_id] = None
            raw = self._raw_by_key_id.pop(key_id, None)
            if raw is not None:
                self._key_cache.pop(raw, None)
        while len(self._recently_revoked) > _RECENT_REVOCATIONS:
            del self._recently_revoked[next(iter(self._recently_revoked))]

    async def from_api_key(self, raw_key: str) -> Principal:
        now = self._clock.monotonic()
        cached = self._key_cache.get(raw_key)
        if cached is not None and cached[0] > now:
            if not self.changes.is_stale(cached[1]):
                return cached[1]
            self._key_cache.pop(raw_key, None)  # its user or orgs changed since: ask again
        # One question to the auth service per key at a time: when a busy key's cached answer
        # expires, the requests that arrive meanwhile wait for that one answer, not ask again.
        pending = self._validating.get(raw_key)
        if pending is not None:
            await asyncio.wait([pending])
            if not pending.cancelled():
                return pending.result()
        answer: asyncio.Future[Principal] = asyncio.get_running_loop().create_future()
        self._validating[raw_key] = answer
        try:
            principal = await self._validate(raw_key, now)
        except BaseException as exc:
            if isinstance(exc, Exception):
                answer.set_exception(exc)
                answer.exception()  # (retrieved: nobody may be waiting)
            else:
                answer.cancel()
            raise
        else:
            answer.set_result(principal)
            return principal
        finally:
            if self._validating.get(raw_key) is answer:
                del self._validating[raw_key]

    async def _validate(self, raw_key: str, now: float, *, retried: bool = False) -> Principal:
        if self._poll is not None and self._follower is None:
            await self._start_following()
        try:
            response = await self._get(
                "/api/v1/auth/api-keys/validate", headers={"X-Api-Key": raw_key}
            )
        except OutboundError as exc:
            raise ServiceUnavailable("auth service unreachable for API key validation") from exc
        if response.status == 401:
            code = _safe_code(response.body)
            raise _KEY_ERRORS.get(code, InvalidApiKey)()
        if response.status != 200:
            raise ServiceUnavailable("auth service could not validate the API key")
        try:
            body = orjson.loads(response.body)
            principal = principal_from_validation(body)
            expires_at = body.get("expiresAt")
            life = (
                (datetime.fromisoformat(expires_at) - self._clock.now()).total_seconds()
                if expires_at
                else self._key_ttl
            )
        except (KeyError, ValueError, TypeError) as exc:  # not an answer our auth service gives
            raise ServiceUnavailable("auth service gave an unreadable API key answer") from exc
        if principal.api_key_id in self._recently_revoked:
            raise RevokedApiKey()  # revoked while the auth service was answering
        ttl = min(self._key_ttl, life)  # never cached past the key's own expiry
        fresh = not self.changes.is_stale(principal)
        if not fresh and not retried:
            # Its user or orgs changed while the auth service was answering: ask once more.
            return await self._validate(raw_key, now, retried=True)
        if ttl > 0 and fresh and (self._poll is None or self._following):
            if len(self._key_cache) > 100_000:
                self.forget_api_key()
            self._key_cache[raw_key] = (now + ttl, principal)
            if principal.api_key_id is not None:
                self._raw_by_key_id[principal.api_key_id] = raw_key
        return principal

    # -- following revocations ---------------------------------------------------------------

    async def _start_following(self) -> None:
        """Learn the feed's cursor before the first key is validated, so no revocation that
        commits after that validation read can be missed; then follow in the background."""
        async with self._follow_lock:
            if self._follower is not None:
                return
            self._cursor, changes, _ = await self._read_feed(None)
            self.changes.apply(changes)
            self._following = True
            self._follower = asyncio.create_task(self._follow(), name="api-key-revocations")

    async def _read_feed(
        self, after: int | None, wait: float = 0.0
    ) -> tuple[int, list[PrincipalChange], bool]:
        params: dict[str, float] = {} if after is None else {"after": after}
        if wait > 0:
            params["wait"] = wait
        try:
            response = await self._get(
                REVOCATION_FEED,
                headers=self._feed_headers,
                params=params,
                timeout_seconds=self._timeout + wait,
            )
            if response.status != 200:
                raise ValueError(f"the feed answered {response.status}")
            body = orjson.loads(response.body)
            found = (
                int(body["cursor"]),
                [PrincipalChange.from_wire(c) for c in body["changes"]],
                bool(body.get("hasMore")),
            )
        except (OutboundError, KeyError, ValueError, TypeError) as exc:
            raise ServiceUnavailable("auth service unreachable for the revocation feed") from exc
        self._feed_read_at = self._clock.monotonic()
        return found

    async def _catch_up(self, wait: float = 0.0) -> None:
        while True:
            cursor, changes, more = await self._read_feed(self._cursor, wait)
            if cursor < self._cursor:
                # Not the feed we were following (a new auth database): trust nothing cached,
                # and start over from its recent principal changes.
                self.forget_api_key()
                self.changes.clear()
                cursor, changes, more = await self._read_feed(None)
            self._cursor = cursor
            self.forget_revoked([c.api_key_id for c in changes if c.api_key_id is not None])
            self.changes.apply(changes)
            if not more:
                return

    def _set_following(self, following: bool) -> None:
        if following == self._following:
            return
        self._following = following
        if following:
            log.info("following API-key revocations again")
        else:
            # Revocations may be missed from now on: answers must come from the auth service.
            self.forget_api_key()
            log.warning("cannot follow API-key revocations; not caching API keys meanwhile")

    async def _follow(self) -> None:
        assert self._poll is not None
        while True:
            try:
                if self._redis_url:
                    await self._follow_pushed(self._poll)
                else:
                    if not self._following:
                        await self._catch_up()  # back: caught up, so caching is safe again
                        self._set_following(True)
                    loop = asyncio.get_running_loop()
                    asked = loop.time()
                    await self._catch_up(wait=_FEED_WAIT_SECONDS)
                    # An answer comes at once when there is news; ask again soon, not at once.
                    await asyncio.sleep(max(0.0, self._poll - (loop.time() - asked)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._following:
                    log.warning("revocation feed: %s", exc)
                self._set_following(False)
                await asyncio.sleep(self._poll)

    async def _follow_pushed(self, poll: float) -> None:
        """Subscribe, catch up with the feed, then apply each announced revocation at once."""
        # Waits for announcements are bounded by get_message's own timeout (`poll`).
        redis = redis_client(
            self._redis_url,
            connect_timeout_seconds=2.0,
            command_timeout_seconds=max(2.0, 2 * poll),
            max_connections=2,
        )
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(REVOCATION_CHANNEL)
            await self._catch_up()  # anything revoked before the subscription took effect
            self._set_following(True)
            loop = asyncio.get_running_loop()
            checked = loop.time()
            while True:
                message = await pubsub.get_message(timeout=poll)
                self._feed_read_at = self._clock.monotonic()  # the subscription is alive
                if message is not None and message.get("type") == "message":
                    try:
                        announced = orjson.loads(message["data"])
                        key_id = announced.get("apiKeyId")
                        if key_id is not None:
                            self.forget_revoked([uuid.UUID(key_id)])
                    except (AttributeError, ValueError, TypeError, orjson.JSONDecodeError):
                        log.warning("ignoring an unreadable revocation message")
                    else:
                        if key_id is None:  # a principal change: the feed says whose
                            await self._catch_up()
                            checked = loop.time()
                if loop.time() - checked >= _PUSHED_FEED_CHECK_SECONDS:
                    await self._catch_up()
                    checked = loop.time()
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            await redis.aclose()


def principal_from_validation(body: dict[str, Any]) -> Principal:
    return Principal(
        user_id=uuid.UUID(body["userId"]),
        roles=frozenset(body.get("roles", [])),
        org_ids=frozenset(uuid.UUID(o) for o in body.get("orgIds", [])),
        method="api_key",
        api_key_id=uuid.UUID(body["apiKeyId"]) if body.get("apiKeyId") else None,
        username=body.get("username"),
        key_org_id=uuid.UUID(body["orgId"]) if body.get("orgId") else None,
        session_id=uuid.UUID(body["sessionId"]) if body.get("sessionId") else None,
        issued_seq=int(body.get("feedSeq", 0)),
    )


def _safe_code(body: bytes) -> str:
    try:
        return str(orjson.loads(body).get("code", ""))
    except (ValueError, AttributeError):
        return ""
