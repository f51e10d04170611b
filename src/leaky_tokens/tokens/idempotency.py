"""Idempotent inference (issue 12): `Idempotency-Key` on `/v1/chat/completions` and
`/v1/responses`.

A key (at most 255 visible characters) is scoped to the caller's API key (to the user for a
JWT) and stored hashed. The claim is the first durable write, before anything is reserved or
sent to a provider; then:

- same key, same body (path + canonical JSON), answered -> the stored answer replayed (a stream
  as the same SSE bytes), `Idempotent-Replayed: true`, nothing reserved or charged;
- same key, another body -> 422 `idempotency_key_reused` (not 409: SDKs retry 409);
- same key while the first call is in flight -> 409 `idempotency_request_in_progress` with
  `Retry-After` / `retry-after-ms`, so the SDK retries into the replay;
- a holder that crashed leaves its claim until `idempotency_lease_seconds` pass; the next
  attempt then takes it over (a conditional update: one winner).

Only a 200 answered in full is kept (a stream only when it reached `[DONE]` /
`response.completed`). Any other outcome (an error, a refused call, a stream cut or left by its
client) releases the key, so a retry runs again: errors before output charged nothing; a stream
cut mid-way was charged what it streamed, and its retry is a new call. Keys are kept
`idempotency_ttl_seconds` (24 h), then swept.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from leaky_tokens.settings import InferenceSettings
from leaky_tokens.shared.clock import Clock
from leaky_tokens.shared.database import Database
from leaky_tokens.shared.errors import AppError
from leaky_tokens.shared.principal import Principal
from leaky_tokens.tokens.idempotency_repository import COMPLETED, IdempotencyRepository
from leaky_tokens.tokens.inference.errors import InvalidInferenceRequest

log = logging.getLogger("leaky_tokens.tokens.idempotency")

HEADER = "idempotency-key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
RETRY_AFTER_MS = 250  # how soon a duplicate in flight is asked to come back


class IdempotencyKeyReused(AppError):
    """The key was used with another body: a client bug, never retried."""

    status = 422
    code = "IDEMPOTENCY_KEY_REUSED"
    default_message = (
        "This Idempotency-Key was already used with a different request body; use a new key "
        "for a new request."
    )
    openai_type = "invalid_request_error"
    openai_code = "idempotency_key_reused"


class IdempotencyInFlight(AppError):
    """The first call with this key is still running: retry shortly to get its answer."""

    status = 409
    code = "IDEMPOTENCY_REQUEST_IN_PROGRESS"
    default_message = (
        "A request with this Idempotency-Key is still in progress; retry shortly to receive "
        "its answer."
    )
    openai_type = "invalid_request_error"
    openai_code = "idempotency_request_in_progress"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def fingerprint(path: str, raw: bytes) -> str:
    """What makes two requests "the same": the path and the body as canonical JSON (key order
    and spacing do not matter); a body that is not JSON counts byte for byte."""
    try:
        canonical = orjson.dumps(orjson.loads(raw), option=orjson.OPT_SORT_KEYS)
    except orjson.JSONDecodeError:
        canonical = raw
    return hashlib.sha256(path.encode() + b"\n" + canonical).hexdigest()


def scope_of(principal: Principal) -> str:
    if principal.api_key_id is not None:
        return f"key:{principal.api_key_id}"
    return f"user:{principal.user_id}"


def checked_key(value: str) -> str:
    if not value or len(value) > MAX_KEY_LENGTH or not all(" " <= c <= "~" for c in value):
        message = (
            f"Invalid 'Idempotency-Key' header: expected 1 to {MAX_KEY_LENGTH} visible ASCII "
            "characters."
        )
        raise InvalidInferenceRequest(
            message, details=[{"field": "Idempotency-Key", "message": message}]
        )
    return value


@dataclass(frozen=True, slots=True)
class Claim:
    """This attempt holds the key."""

    scope: str
    key_hash: str
    owner: uuid.UUID


@dataclass(frozen=True, slots=True)
class Replay:
    status_code: int
    content_type: str
    body: bytes

    def response(self) -> Response:
        return Response(
            self.body,
            status_code=self.status_code,
            media_type=None,
            headers={"content-type": self.content_type, REPLAYED_HEADER: "true"},
        )


class IdempotencyKeys:
    """The claims on the token service's database (SQLite or PostgreSQL alike)."""

    def __init__(self, database: Database, settings: InferenceSettings, clock: Clock) -> None:
        self.database = database
        self.settings = settings
        self.clock = clock

    async def claim(self, scope: str, key: str, fingerprint: str) -> Claim | Replay:
        hashed = key_hash(key)
        owner = uuid.uuid4()
        ttl = timedelta(seconds=self.settings.idempotency_ttl_seconds)
        lease = timedelta(seconds=self.settings.idempotency_lease_seconds)
        # A replay (the common retry) reads only: no write transaction, no SQLite write lock.
        now = self.clock.now()
        async with self.database.read() as session:
            seen = await IdempotencyRepository(session).get(scope, hashed)
        if seen is not None and seen.expires_at > now:
            if seen.fingerprint != fingerprint:
                raise IdempotencyKeyReused()
            if seen.state == COMPLETED:
                return Replay(
                    seen.status_code or 200,
                    seen.content_type or "application/json",
                    seen.body or b"",
                )
            if seen.lease_until > now:
                raise IdempotencyInFlight(
                    headers={"Retry-After": "1", "retry-after-ms": str(RETRY_AFTER_MS)}
                )
        for _ in range(3):  # a row deleted between our insert and read: try again
            now = self.clock.now()
            async with self.database.connection() as conn:
                keys = IdempotencyRepository(conn)
                if await keys.insert(
                    scope,
                    hashed,
                    fingerprint,
                    owner,
                    now=now,
                    lease_until=now + lease,
                    expires_at=now + ttl,
                ):
                    return Claim(scope, hashed, owner)
                stored = await keys.get(scope, hashed)
                if stored is None:
                    continue
                expired = stored.expires_at <= now
                if not expired and stored.fingerprint != fingerprint:
                    raise IdempotencyKeyReused()
                if not expired and stored.state == COMPLETED:
                    return Replay(
                        stored.status_code or 200,
                        stored.content_type or "application/json",
                        stored.body or b"",
                    )
                if not expired and stored.lease_until > now:
                    raise IdempotencyInFlight(
                        headers={"Retry-After": "1", "retry-after-ms": str(RETRY_AFTER_MS)}
                    )
                # The holder's lease ran out (it crashed), or the record expired unswept.
                if await keys.take_over(
                    scope,
                    hashed,
                    previous_owner=stored.owner,
                    owner=owner,
                    fingerprint=fingerprint,
                    now=now,
                    lease_until=now + lease,
                    expires_at=now + ttl,
                ):
                    log.warning("took over idempotency key of a call that never finished")
                    return Claim(scope, hashed, owner)
            raise IdempotencyInFlight(
                headers={"Retry-After": "1", "retry-after-ms": str(RETRY_AFTER_MS)}
            )
        raise IdempotencyInFlight(
            headers={"Retry-After": "1", "retry-after-ms": str(RETRY_AFTER_MS)}
        )

    async def complete(self, claim: Claim, status: int, content_type: str, body: bytes) -> None:
        expires_at = self.clock.now() + timedelta(seconds=self.settings.idempotency_ttl_seconds)
        async with self.database.connection() as conn:
            done = await IdempotencyRepository(conn).complete(
                claim.scope,
                claim.key_hash,
                claim.owner,
                status_code=status,
                content_type=content_type,
                body=body,
                expires_at=expires_at,
            )
        if not done:
            log.warning("an idempotency key was taken over before its call completed")

    async def release(self, claim: Claim) -> None:
        async with self.database.connection() as conn:
            await IdempotencyRepository(conn).release(claim.scope, claim.key_hash, claim.owner)

    async def sweep(self, batch: int = 500) -> int:
        """Delete expired keys; the number deleted."""
        async with self.database.connection() as conn:
            return await IdempotencyRepository(conn).delete_expired(self.clock.now(), batch)

    async def sweep_forever(self) -> None:
        while True:
            try:
                while await self.sweep() > 0:
                    pass
            except Exception:
                log.exception("idempotency key sweep failed")
            await asyncio.sleep(self.settings.idempotency_sweep_seconds)


async def idempotent(
    request: Request,
    principal: Principal,
    raw: bytes,
    run: Callable[[], Awaitable[Response]],
) -> Response:
    """`run()` under the request's Idempotency-Key, if it has one."""
    header = request.headers.get(HEADER)
    keys: IdempotencyKeys | None = getattr(request.app.state, "idempotency_keys", None)
    if header is None or keys is None:
        return await run()
    claimed = await keys.claim(
        scope_of(principal), checked_key(header), fingerprint(request.url.path, raw)
    )
    if isinstance(claimed, Replay):
        return claimed.response()
    try:
        response = await run()
    except BaseException:
        await asyncio.shield(keys.release(claimed))
        raise
    return RecordedResponse(response, keys, claimed)


class RecordedResponse(Response):
    """Sends `inner` and keeps what it sent under the claim: a 200 sent in full (a stream that
    reached its proper end) is stored for replays; anything else releases the key."""

    def __init__(self, inner: Response, keys: IdempotencyKeys, claim: Claim) -> None:
        super().__init__(status_code=inner.status_code)
        self.inner = inner
        self.keys = keys
        self.claim = claim

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = 0
        content_type = "application/json"
        pieces: list[bytes] = []
        size = 0
        limit = self.keys.settings.idempotency_max_answer_bytes
        ended = False

        async def recording_send(message: Message) -> None:
            nonlocal status, content_type, size, ended
            if message["type"] == "http.response.start":
                status = int(message["status"])
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-type":
                        content_type = value.decode("latin-1")
            elif message["type"] == "http.response.body":
                body: bytes = message.get("body", b"")
                if size <= limit:
                    pieces.append(body)
                    size += len(body)
                if not message.get("more_body", False):
                    ended = True
            await send(message)

        try:
            await self.inner(scope, receive, recording_send)
        finally:
            keep = status == 200 and ended and size <= limit and _finished(self.inner)
            if keep:
                await asyncio.shield(
                    self.keys.complete(self.claim, status, content_type, b"".join(pieces))
                )
            else:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.keys.release(self.claim))


def _finished(response: Any) -> bool:
    """A metered stream counts only if it reached its proper end (not cut, not abandoned)."""
    stream = getattr(response, "stream", None)
    outcome = getattr(stream, "outcome", None)
    return outcome is None or outcome == "completed"
