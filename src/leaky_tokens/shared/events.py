"""Events between services: one publisher/consumer interface, two transports.

* HTTP push: the publisher POSTs a JSON batch to the consumer's ingestion endpoint, which stores
  it before answering, so a 2xx means "handled". Nothing waits in transit; the publisher's outbox
  is the buffer. Authenticated with a shared internal token (`X-Internal-Token`).
* Redis Streams: the publisher XADDs each event to `<prefix><stream>` (MAXLEN ~ as a safety cap);
  consumers in one group XREADGROUP, XACK once the handler has stored the batch, and XAUTOCLAIM
  entries a dead consumer left pending. The consumer trims entries every group acknowledged.

Contract (tests/contract/test_event_transport_contract.py): `publish` returns only once the
transport holds the batch (raising `PublishFailed` otherwise, so the caller retries); every event
it accepted reaches a running consumer's handler at least once, also across consumer restarts;
a handler that raises gets the events again. Handlers must therefore be idempotent (event ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import socket
import stat
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Annotated, Any, Protocol

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, StringConstraints, ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from leaky_tokens.shared.errors import InvalidRequest, ServiceUnavailable, Unauthenticated
from leaky_tokens.shared.outbound import AiohttpOutbound, Outbound, OutboundError
from leaky_tokens.shared.private_files import private_directory
from leaky_tokens.shared.schemas import ApiModel, UtcInput

log = logging.getLogger("leaky_tokens.events")

INTERNAL_TOKEN_HEADER = "X-Internal-Token"
INTERNAL_TOKEN_FILE = "internal_token"
MAX_BATCH = 1000

StreamName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]


class Event(ApiModel):
    """One event as it travels: an envelope around the producer's payload."""

    event_id: uuid.UUID
    stream: StreamName
    type: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    aggregate_id: Annotated[str, StringConstraints(max_length=64)] = ""
    occurred_at: UtcInput
    payload: dict[str, Any] = Field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        # Built by hand: the relay encodes every event, and this is several times faster than
        # model_dump (timestamps keep their microseconds).
        return {
            "eventId": str(self.event_id),
            "stream": self.stream,
            "type": self.type,
            "aggregateId": self.aggregate_id,
            "occurredAt": self.occurred_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "payload": self.payload,
        }


class EventBatch(BaseModel):
    """The body of an HTTP push: {"events": [...]} (documents the endpoint)."""

    events: Annotated[list[Event], Field(max_length=MAX_BATCH)]


class _RawBatch(BaseModel):
    # Events are read one by one: an unreadable event is dropped (as a Redis consumer drops an
    # unreadable entry) instead of refusing the batch, which the relay would resend forever.
    events: Annotated[list[dict[str, Any]], Field(max_length=MAX_BATCH)]


class EventBatchAccepted(ApiModel):
    received: int
    rejected: int = 0


EventHandler = Callable[[Sequence[Event]], Awaitable[object]]


class PublishFailed(Exception):
    """The transport did not take the batch; the publisher keeps it and retries."""


class EventPublisher(Protocol):
    async def publish(self, batch: Sequence[Event]) -> None:
        """Hand the batch to the transport; raises PublishFailed when it was not taken."""
        ...

    async def aclose(self) -> None: ...


class EventConsumer(Protocol):
    async def start(self, handler: EventHandler) -> None:
        """Deliver events to `handler` from now on (a batch at a time)."""
        ...

    async def stop(self) -> None:
        """Stop delivering; unacknowledged events go to the next consumer."""
        ...

    async def lag(self) -> dict[str, int]:
        """Per stream: events accepted by the transport but not yet handled."""
        ...


# --- the internal token ------------------------------------------------------------------------


class InvalidInternalToken(Unauthenticated):
    code = "AUTH_INVALID_INTERNAL_TOKEN"
    default_message = f"internal endpoint: missing or wrong {INTERNAL_TOKEN_HEADER}"


def check_internal_token(expected: bytes, offered: str | None) -> None:
    """Refuse (401) a request to an internal endpoint without the shared internal token."""
    if (
        offered is None
        or not expected
        or not hmac.compare_digest(offered.encode("utf-8", "replace"), expected)
    ):
        raise InvalidInternalToken()


def resolve_internal_token(configured: str, data_dir: Path) -> str:
    """The configured token, else the one kept in data_dir/internal_token (made on first use).

    The file is written whole before it appears (link of a finished temp file), so processes
    starting together on one data directory all read the same token."""
    if configured:
        return configured
    private_directory(data_dir)
    path = data_dir / INTERNAL_TOKEN_FILE
    with contextlib.suppress(FileNotFoundError):
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            os.chmod(path, 0o600)  # written by an older version, or copied in by hand
        return _read_token(path)
    tmp = data_dir / f".{INTERNAL_TOKEN_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return _read_token(path)


def _read_token(path: Path) -> str:
    token = path.read_text().strip()
    if not token:
        raise RuntimeError(f"{path} is empty; delete it or set LEAKY_INTERNAL_TOKEN")
    return token


# --- HTTP push ---------------------------------------------------------------------------------


class HttpPushPublisher:
    """POSTs each batch to the consumer's ingestion endpoint; a 2xx means stored."""

    def __init__(self, url: str, outbound: Outbound, *, timeout_seconds: float = 10.0) -> None:
        self._url = url
        self._outbound = outbound
        self._timeout = timeout_seconds

    @classmethod
    def over_aiohttp(
        cls, url: str, token: str, *, timeout_seconds: float = 10.0
    ) -> HttpPushPublisher:
        """Create inside the running loop (aiohttp sessions belong to one)."""
        outbound = AiohttpOutbound(
            max_connections=4,
            headers={INTERNAL_TOKEN_HEADER: token},
            connect_seconds=min(2.0, timeout_seconds),
        )
        return cls(url, outbound, timeout_seconds=timeout_seconds)

    async def publish(self, batch: Sequence[Event]) -> None:
        if not batch:
            return
        body = {"events": [event.to_wire() for event in batch]}
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._outbound.post_json(self._url, body)
        except TimeoutError:
            raise PublishFailed(f"no answer from {self._url} in {self._timeout:g}s") from None
        except OutboundError as exc:
            raise PublishFailed(f"{self._url} unreachable ({exc})") from None
        if not 200 <= response.status < 300:
            raise PublishFailed(f"{self._url} answered {response.status}: {response.body[:200]!r}")

    async def aclose(self) -> None:
        await self._outbound.aclose()


class HttpPushConsumer:
    """The receiving end of HTTP push; `event_ingest_router` routes requests to it."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self._handler: EventHandler | None = None

    async def start(self, handler: EventHandler) -> None:
        self._handler = handler

    async def stop(self) -> None:
        self._handler = None

    async def lag(self) -> dict[str, int]:
        # A push is handled before it is answered: nothing waits in transit (the backlog is the
        # publisher's outbox, which the publisher reports).
        return {}

    def check_token(self, offered: str | None) -> None:
        check_internal_token(self._token, offered)

    async def receive(self, batch: Sequence[Event]) -> None:
        """Hand the batch to the handler; the answer tells the publisher whether it is stored."""
        handler = self._handler
        if handler is None:
            raise ServiceUnavailable("event consumer is not running")
        try:
            await handler(batch)
        except Exception as exc:
            # The publisher keeps the batch and retries; a 503 says so, a 500 would alarm.
            log.warning("could not store a pushed batch: %s: %s", type(exc).__name__, exc)
            raise ServiceUnavailable("event store unavailable; retry later") from exc


def event_ingest_router(path: str, *, state_name: str = "event_receiver") -> APIRouter:
    """POST `path`: the HTTP-push ingestion endpoint, served by `app.state.<state_name>`."""
    router = APIRouter(tags=["internal"])

    @router.post(
        path,
        summary=f"Receive a batch of events (internal; needs {INTERNAL_TOKEN_HEADER})",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": EventBatch.model_json_schema()}},
            }
        },
    )
    async def receive_events(request: Request) -> EventBatchAccepted:
        consumer: HttpPushConsumer = getattr(request.app.state, state_name)
        # The token is checked before the body is read: strangers learn nothing about it.
        consumer.check_token(request.headers.get(INTERNAL_TOKEN_HEADER))
        try:
            batch = _RawBatch.model_validate_json(await request.body())
        except ValidationError as exc:
            from leaky_tokens.shared.http import describe_validation_errors

            message, details = describe_validation_errors(exc.errors())
            raise InvalidRequest(message, details=details) from None
        events: list[Event] = []
        for raw in batch.events:
            found = _event_or_none(raw)
            if found is not None:
                events.append(found)
        if events:
            await consumer.receive(events)
        return EventBatchAccepted(received=len(events), rejected=len(batch.events) - len(events))

    return router


# --- Redis Streams -----------------------------------------------------------------------------


def stream_key(prefix: str, stream: str) -> str:
    return f"{prefix}{stream}"


class RedisStreamPublisher:
    """XADD per event (pipelined, one round trip per batch) to the event's own stream."""

    def __init__(
        self, redis: Redis, *, prefix: str = "lt:events:", maxlen: int = 1_000_000
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._maxlen = maxlen

    async def publish(self, batch: Sequence[Event]) -> None:
        if not batch:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for event in batch:
                    pipe.xadd(
                        stream_key(self._prefix, event.stream),
                        {"event": orjson.dumps(event.to_wire())},
                        maxlen=self._maxlen,
                        approximate=True,
                    )
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise PublishFailed(f"redis: {type(exc).__name__}: {exc}") from None

    async def aclose(self) -> None:
        """The Redis client belongs to whoever made it."""


@dataclass(frozen=True, slots=True)
class _Entry:
    key: str
    entry_id: bytes
    event: Event | None  # None: unreadable or trimmed; acknowledged and dropped


class RedisStreamConsumer:
    """One member of a consumer group reading several streams.

    Loop: first our own pending entries (after a start or a failed handler), then new ones
    (XREADGROUP >, blocking); every `reclaim_every` seconds it also XAUTOCLAIMs entries other
    consumers left pending longer than `reclaim_idle_seconds`, trims what every group has
    acknowledged, and forgets long-idle consumers that hold nothing."""

    def __init__(
        self,
        redis: Redis,
        *,
        streams: Sequence[str],
        prefix: str = "lt:events:",
        group: str = "analytics",
        name: str | None = None,
        batch_size: int = 200,
        block_ms: int = 1000,
        reclaim_idle_seconds: float = 30.0,
        reclaim_every_seconds: float | None = None,
        retry_seconds: float = 0.5,
        max_retry_seconds: float = 10.0,
    ) -> None:
        self._redis = redis
        self._keys = [stream_key(prefix, s) for s in streams]
        self._group = group
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._batch = batch_size
        self._block_ms = block_ms
        self._reclaim_idle_ms = int(reclaim_idle_seconds * 1000)
        self._reclaim_every = (
            reclaim_every_seconds
            if reclaim_every_seconds is not None
            else min(5.0, reclaim_idle_seconds / 2)
        )
        self._retry = retry_seconds
        self._max_retry = max_retry_seconds
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def start(self, handler: EventHandler) -> None:
        self._stopping = asyncio.Event()
        try:
            await self._ensure_groups()
        except (RedisError, OSError) as exc:
            # Start anyway: the loop retries and creates the groups once Redis answers.
            log.warning("event consumer: redis unavailable at start (%s)", exc)
        self._task = asyncio.create_task(self._run(handler), name=f"events-consumer-{self.name}")

    async def stop(self) -> None:
        """Stop once the call in flight returns (a blocked XREADGROUP does within block_ms; a
        handler gets a few seconds to store and acknowledge its batch), cancelling only after
        that: cancelling redis-py mid-command can leave the task hanging (redis/redis-py#2579,
        #2663). Whatever was not acknowledged stays pending for the next consumer."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        await finish_task(task, grace_seconds=self._block_ms / 1000 + 5.0)

    async def lag(self) -> dict[str, int]:
        """Per stream: entries not yet delivered to the group plus delivered but unacknowledged."""
        found: dict[str, int] = {}
        for key in self._keys:
            try:
                groups = await self._redis.xinfo_groups(key)
            except ResponseError:  # no such stream yet
                found[key] = 0
                continue
            for group in groups:
                if _text(group.get("name")) != self._group:
                    continue
                lag = group.get("lag")
                undelivered = int(lag) if lag is not None else await self._count_after(key, group)
                found[key] = undelivered + int(group.get("pending", 0))
        return found

    async def _count_after(self, key: str, group: dict[str, Any]) -> int:
        # Redis reports no lag after some trims; count what lies past the group's position.
        last = _text(group.get("last-delivered-id")) or "0-0"
        entries: Any = await self._redis.xrange(key, min=f"({last}", max="+", count=100_000)
        return len(entries or [])

    async def _ensure_groups(self) -> None:
        for key in self._keys:
            try:
                # From the stream's start: events published before analytics ever ran count too.
                await self._redis.xgroup_create(key, self._group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _run(self, handler: EventHandler) -> None:
        own_pending_first = True
        next_reclaim = 0.0
        failures = 0
        while not self._stopping.is_set():
            try:
                if time.monotonic() >= next_reclaim:
                    await self._reclaim(handler)
                    await self._housekeep()
                    next_reclaim = time.monotonic() + self._reclaim_every
                if own_pending_first:
                    entries = await self._read("0", block_ms=None)
                    if not entries:
                        own_pending_first = False
                        continue
                else:
                    entries = await self._read(">", block_ms=self._block_ms)
                if entries:
                    await self._deliver(handler, entries)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Unacknowledged entries stay ours and are read again ("0") after a pause.
                failures += 1
                own_pending_first = True
                pause = min(self._max_retry, self._retry * 2 ** min(failures - 1, 10))
                if failures == 1 or failures % 20 == 0:
                    log.warning(
                        "event consumer failed (%s: %s); retrying in %.1fs",
                        type(exc).__name__,
                        exc,
                        pause,
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), pause)
                if self._stopping.is_set():
                    return
                with contextlib.suppress(RedisError, OSError):
                    await self._ensure_groups()  # a stream deleted or Redis restarted empty

    async def _read(self, position: str, *, block_ms: int | None) -> list[_Entry]:
        answer: Any = await self._redis.xreadgroup(
            self._group,
            self.name,
            dict.fromkeys(self._keys, position),
            count=self._batch,
            block=block_ms,
        )
        entries: list[_Entry] = []
        for key, items in answer or []:
            for entry_id, fields in items:
                entries.append(_Entry(_text(key), entry_id, _decode(fields)))
        return entries

    async def _deliver(self, handler: EventHandler, entries: list[_Entry]) -> None:
        events = [e.event for e in entries if e.event is not None]
        if events:
            await handler(events)
        by_key: dict[str, list[bytes]] = {}
        for entry in entries:
            by_key.setdefault(entry.key, []).append(entry.entry_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, ids in by_key.items():
                pipe.xack(key, self._group, *ids)
            await pipe.execute()

    async def _reclaim(self, handler: EventHandler) -> None:
        for key in self._keys:
            start: str | bytes = "0-0"
            for _ in range(100):  # bounded per round
                answer = await self._redis.xautoclaim(
                    key,
                    self._group,
                    self.name,
                    min_idle_time=self._reclaim_idle_ms,
                    start_id=start,
                    count=self._batch,
                )
                start, claimed = answer[0], answer[1]
                entries = [_Entry(key, entry_id, _decode(fields)) for entry_id, fields in claimed]
                if entries:
                    log.info("reclaimed %d stale events from %s", len(entries), key)
                    await self._deliver(handler, entries)
                if _text(start) == "0-0":
                    break

    async def _housekeep(self) -> None:
        for key in self._keys:
            try:
                groups = await self._redis.xinfo_groups(key)
            except ResponseError:
                continue
            minimum: tuple[int, int] | None = None
            for group in groups:
                position = _id_tuple(_text(group.get("last-delivered-id")) or "0-0")
                if int(group.get("pending", 0)):
                    summary = await self._redis.xpending(key, _text(group.get("name")))
                    oldest = summary.get("min")
                    if oldest is not None:
                        position = min(position, _id_tuple(_text(oldest)))
                minimum = position if minimum is None else min(minimum, position)
            if minimum is not None and minimum > (0, 0):
                # Entries below every group's position are acknowledged by all: drop them.
                await self._redis.xtrim(key, minid=f"{minimum[0]}-{minimum[1]}", approximate=True)
            for consumer in await self._redis.xinfo_consumers(key, self._group):
                name = _text(consumer.get("name"))
                idle_ms = int(consumer.get("idle", 0))
                if (
                    name != self.name
                    and not int(consumer.get("pending", 0))
                    and idle_ms > 3_600_000
                ):
                    await self._redis.xgroup_delconsumer(key, self._group, name)


async def finish_task(task: asyncio.Task[None], *, grace_seconds: float) -> None:
    """Let a task asked to stop finish within the grace period, else cancel it (and wait a
    little more); a task that still won't end is abandoned with a warning."""
    done, _ = await asyncio.wait({task}, timeout=grace_seconds)
    if not done:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5.0)
    if not done:
        log.warning("task %s did not stop; abandoned", task.get_name())
        return
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s failed", task.get_name(), exc_info=task.exception())


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)


def _id_tuple(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


def _event_or_none(raw: dict[str, Any]) -> Event | None:
    try:
        return Event.model_validate(raw)
    except ValidationError as exc:
        log.error("dropping an unreadable event: %s", str(exc)[:300])
        return None


def _decode(fields: dict[bytes, bytes] | None) -> Event | None:
    if not fields:
        return None  # trimmed while pending
    raw = fields.get(b"event")
    try:
        if raw is None:
            raise ValueError("no 'event' field")
        return Event.model_validate_json(raw)
    except (ValueError, ValidationError) as exc:
        log.error("dropping an unreadable stream entry: %s", str(exc)[:300])
        return None
