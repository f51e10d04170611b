"""Token purchases as a durable saga: starting one (validation, idempotency) and the
orchestrator that drives each saga STARTED -> PAYMENT_RESERVED -> TOKENS_ALLOCATED -> COMPLETED,
or compensates it to FAILED.

Every step commits its state change and its outbox event in one transaction, guarded by the
saga's status and lease (a fence), and every payment call is idempotent per (saga, step); so a
process killed anywhere resumes on restart, and two replicas never run a step twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from leaky_tokens.settings import TokensSettings
from leaky_tokens.shared.clock import Clock
from leaky_tokens.shared.database import Database, Executes
from leaky_tokens.shared.errors import Forbidden, InvalidRequest
from leaky_tokens.shared.pagination import PageRequest
from leaky_tokens.shared.principal import Principal
from leaky_tokens.tokens.errors import (
    IdempotencyConflict,
    PurchaseLimitExceeded,
    PurchasesDisabled,
    SagaNotFound,
)
from leaky_tokens.tokens.flags import FeatureFlags, FlagState
from leaky_tokens.tokens.models import PurchaseSaga
from leaky_tokens.tokens.outbox import purchase_event
from leaky_tokens.tokens.payments import PaymentError, PaymentGateway
from leaky_tokens.tokens.repository import QuotaLedger
from leaky_tokens.tokens.saga_repository import TERMINAL, SagaRepository
from leaky_tokens.tokens.service import ORG_POOL, USER_POOL, TokenService, check_provider

log = logging.getLogger("leaky_tokens.tokens.saga")

STARTED = "STARTED"
PAYMENT_RESERVED = "PAYMENT_RESERVED"
TOKENS_ALLOCATED = "TOKENS_ALLOCATED"
COMPLETED = "COMPLETED"
COMPENSATING = "COMPENSATING"
FAILED = "FAILED"
MAX_KEY_LENGTH = 100


@dataclass(frozen=True, slots=True)
class PurchaseRequest:
    user_id: uuid.UUID
    org_id: uuid.UUID | None
    provider: str
    tokens: int


def clean_idempotency_key(raw: str | None) -> str | None:
    if raw is None:
        return None
    key = raw.strip()
    if not key or len(key) > MAX_KEY_LENGTH:
        message = (
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters after trimming "
            f"(got {len(key)})"
        )
        raise InvalidRequest(message, details=[{"field": "Idempotency-Key", "message": message}])
    return key


def request_hash(request: PurchaseRequest) -> str:
    canonical = {
        "userId": str(request.user_id),
        "orgId": str(request.org_id) if request.org_id else None,
        "provider": request.provider,
        "tokens": request.tokens,
    }
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


class PurchaseService:
    """The HTTP-facing rules of purchases; the orchestrator does the work."""

    def __init__(
        self,
        database: Database,
        settings: TokensSettings,
        clock: Clock,
        flags: FeatureFlags,
        wake_orchestrator: Callable[[], None],
    ) -> None:
        self.db = database
        self.settings = settings
        self.clock = clock
        self.flags = flags
        self._wake = wake_orchestrator

    async def start_purchase(
        self, principal: Principal, request: PurchaseRequest, raw_key: str | None
    ) -> tuple[PurchaseSaga, bool]:
        """The saga for this request: (saga, True) when new; (saga, False) when the same key
        and payload were seen before. A key reused with another payload is a 409."""
        TokenService.authorise_user(principal, request.user_id)
        if request.org_id is not None:
            TokenService.authorise_org(principal, request.org_id)
        if principal.session_id is not None:
            # An agent session's credential spends its budget; it never buys (issue 13).
            raise Forbidden("an agent session's credential cannot buy tokens")
        if not await self.flags.enabled("saga.purchases-enabled"):
            raise PurchasesDisabled()
        check_provider(request.provider)
        maximum = self.settings.max_purchase_tokens
        if request.tokens > maximum:
            message = f"tokens must be at most {maximum} per purchase"
            raise InvalidRequest(message, details=[{"field": "tokens", "message": message}])
        key = clean_idempotency_key(raw_key)
        digest = request_hash(request)
        now = self.clock.now()
        saga = PurchaseSaga(
            id=uuid.uuid4(),
            user_id=request.user_id,
            org_id=request.org_id,
            provider=request.provider,
            tokens=request.tokens,
            idempotency_key=key,
            request_hash=digest,
            status=STARTED,
            payment_reserved=False,
            tokens_allocated=False,
            failure_reason=None,
            attempts=0,
            next_attempt_at=now,
            lease_owner=None,
            lease_expires_at=None,
            created_at=now,
            updated_at=now,
        )
        async with self.db.transaction() as session:
            repo = SagaRepository(session)
            existing = await repo.by_key(request.user_id, key) if key else None
            if existing is None:
                await self._check_daily_limits(repo, request, now)
                if await repo.add(saga):
                    await QuotaLedger(session).add_event(
                        _event("PurchaseStarted", saga, STARTED, now)
                    )
                    existing = None
                else:  # a concurrent request with the same key won the insert
                    assert key is not None
                    existing = await repo.by_key(request.user_id, key)
                    assert existing is not None
        if existing is not None:
            if existing.request_hash != digest:
                raise IdempotencyConflict()
            return existing, False
        self._wake()
        return saga, True

    async def _check_daily_limits(
        self, repo: SagaRepository, request: PurchaseRequest, now: datetime
    ) -> None:
        """Per user per UTC day, before anything reaches the payment adapter: at most so many
        purchases and so many tokens (sagas that ended FAILED cost nothing and do not count).
        Checked under a per-user lock, so concurrent purchases cannot pass the cap together."""
        await repo.lock_purchases_of(request.user_id)
        day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        count, tokens = await repo.purchased_since(request.user_id, day)
        max_count = self.settings.max_purchases_per_user_per_day
        max_tokens = self.settings.max_purchase_tokens_per_user_per_day
        if count + 1 > max_count or tokens + request.tokens > max_tokens:
            retry = max(1, math.ceil((day + timedelta(days=1) - now).total_seconds()))
            raise PurchaseLimitExceeded(
                f"daily purchase limit reached: at most {max_count} purchases and "
                f"{max_tokens} tokens per user per UTC day ({count} purchases, {tokens} tokens "
                "today)",
                headers={"Retry-After": str(retry)},
            )

    async def get_purchase(self, principal: Principal, reference: str) -> PurchaseSaga:
        """By saga id or by the caller's idempotency key; another user's saga is not found."""
        async with self.db.read() as session:
            repo = SagaRepository(session)
            saga = None
            with contextlib.suppress(ValueError):
                saga = await repo.by_id(uuid.UUID(reference))
            if saga is None or not principal.may_act_for_user(saga.user_id):
                # Not an id the caller may see: it may be the caller's own key, even one that
                # happens to look like a UUID.
                saga = await repo.by_key(principal.user_id, reference.strip())
        if saga is None or not principal.may_act_for_user(saga.user_id):
            raise SagaNotFound()
        return saga

    async def purchase_events(self, principal: Principal, reference: str) -> list[dict[str, Any]]:
        """The saga's outbox trail (steps and compensations), oldest first."""
        saga = await self.get_purchase(principal, reference)
        async with self.db.read() as session:
            return await SagaRepository(session).events_of(saga.id)

    async def read_flags(self, principal: Principal) -> dict[str, FlagState]:
        if not principal.is_admin:
            raise Forbidden("only an ADMIN may read feature flags")
        return await self.flags.states()

    async def set_flag(
        self, principal: Principal, name: str, enabled: bool
    ) -> dict[str, FlagState]:
        if not principal.is_admin:
            raise Forbidden("only an ADMIN may change feature flags")
        return await self.flags.set(name, enabled)

    async def list_purchases(
        self, principal: Principal, page: PageRequest, user_id: uuid.UUID | None = None
    ) -> tuple[list[PurchaseSaga], int]:
        """Newest first: a USER's own sagas; an ADMIN's pick of user, else everyone's."""
        if user_id is not None and not principal.may_act_for_user(user_id):
            raise Forbidden("you may only list your own purchases")
        if user_id is None and not principal.is_admin:
            user_id = principal.user_id
        async with self.db.read() as session:
            sagas, total = await SagaRepository(session).page_of_user(
                user_id, page.offset, page.page_size
            )
        return list(sagas), total


def _event(
    event_type: str, saga: PurchaseSaga, status: str, now: Any, reason: str | None = None
) -> Any:
    return purchase_event(
        event_type,
        saga_id=saga.id,
        user_id=saga.user_id,
        org_id=saga.org_id,
        provider=saga.provider,
        tokens=saga.tokens,
        status=status,
        now=now,
        reason=reason,
    )


# Called with (event type, saga id) right after a step's transaction committed; the crash tests
# install one that ends the process there, as a SIGKILL would.
StepObserver = Callable[[str, uuid.UUID], None]


class _Transient(Exception):
    """A step that may succeed later (payment provider down, a database hiccup)."""


class SagaOrchestrator:
    """Claims due sagas (leases) and drives each to COMPLETED or FAILED."""

    def __init__(
        self,
        database: Database,
        settings: TokensSettings,
        clock: Clock,
        flags: FeatureFlags,
        payments: PaymentGateway,
        *,
        owner: str | None = None,
        step_committed: StepObserver | None = None,
    ) -> None:
        self.db = database
        self._step_committed = step_committed
        self.settings = settings
        self.clock = clock
        self.flags = flags
        self.payments = payments
        self.owner = owner or f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.window = timedelta(seconds=settings.quota_window_seconds)
        self.lease = timedelta(seconds=settings.saga_lease_seconds)
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run_forever(self) -> None:
        while True:
            try:
                while await self.drive_due() > 0:
                    pass
            except Exception:
                log.exception("saga orchestrator pass failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.saga_poll_interval_seconds):
                    await self._wake.wait()
            self._wake.clear()

    async def drive_due(self, limit: int = 20) -> int:
        async with self.db.transaction() as session:
            claimed = await SagaRepository(session).claim_due(
                self.owner, self.clock.now(), self.lease, limit
            )
        for saga_id in claimed:
            await self.drive(saga_id)
        return len(claimed)

    async def drive(self, saga_id: uuid.UUID) -> None:
        """Run one claimed saga until it ends, waits for a retry, or is taken over."""
        try:
            while True:
                async with self.db.read() as session:
                    saga = await SagaRepository(session).by_id(saga_id)
                if saga is None or saga.lease_owner != self.owner or saga.status in TERMINAL:
                    return
                try:
                    moved = await self._step(saga)
                except _Transient as exc:
                    await self._retry_later(saga, str(exc))
                    return
                if not moved:
                    return
        finally:
            async with self.db.transaction() as session:
                await SagaRepository(session).release_lease(saga_id, self.owner)

    async def _move(
        self,
        saga: PurchaseSaga,
        to_status: str,
        event_type: str,
        *,
        reason: str | None = None,
        on_commit: Callable[[Executes], Any] | None = None,
        **values: Any,
    ) -> bool:
        now = self.clock.now()
        async with self.db.transaction() as session:
            repo = SagaRepository(session)
            moved = await repo.move(
                saga.id,
                self.owner,
                saga.status,
                now,
                status=to_status,
                attempts=0,
                lease_expires_at=now + self.lease,
                **values,
            )
            if not moved:
                return False  # someone else holds it now, or it already moved
            if on_commit is not None:
                await on_commit(session)
            await QuotaLedger(session).add_event(_event(event_type, saga, to_status, now, reason))
        if self._step_committed is not None:
            self._step_committed(event_type, saga.id)
        return True

    async def _pay(self, call: Callable[[], Any]) -> str | None:
        """Run a payment call: None on success, the decline reason when it is permanent."""
        try:
            await call()
        except PaymentError as exc:
            if exc.permanent:
                return str(exc)
            raise _Transient(str(exc)) from exc
        return None

    async def _step(self, saga: PurchaseSaga) -> bool:
        if saga.status == STARTED:
            declined = await self._pay(lambda: self.payments.reserve(saga.id, saga.tokens))
            if declined:
                return await self._start_compensating(saga, declined)
            return await self._move(
                saga, PAYMENT_RESERVED, "PaymentReserved", payment_reserved=True
            )
        if saga.status == PAYMENT_RESERVED:
            if await self.flags.enabled("saga.simulate-failure"):
                reason = "simulated failure after PAYMENT_RESERVED (saga.simulate-failure)"
                return await self._start_compensating(saga, reason)
            kind, owner = self._pool_of(saga)

            async def allocate(session: Executes) -> None:
                await QuotaLedger(session).add_credit(
                    kind, owner, saga.provider, saga.tokens, self.clock.now(), self.window
                )

            return await self._move(
                saga, TOKENS_ALLOCATED, "TokensAllocated", on_commit=allocate, tokens_allocated=True
            )
        if saga.status == TOKENS_ALLOCATED:
            declined = await self._pay(lambda: self.payments.capture(saga.id, saga.tokens))
            if declined:
                return await self._start_compensating(saga, declined)
            return await self._move(saga, COMPLETED, "PurchaseCompleted")
        if saga.status == COMPENSATING:
            return await self._compensate(saga)
        raise RuntimeError(f"saga {saga.id} in unknown status {saga.status}")

    async def _start_compensating(self, saga: PurchaseSaga, reason: str) -> bool:
        return await self._move(
            saga, COMPENSATING, "PurchaseCompensating", reason=reason, failure_reason=reason
        )

    async def _compensate(self, saga: PurchaseSaga) -> bool:
        """Undo in reverse: deallocate tokens, then release the payment, then FAILED."""
        if saga.tokens_allocated:
            kind, owner = self._pool_of(saga)

            async def deallocate(session: Executes) -> None:
                # Exactly what the allocation added, from the credit only (the allowance is
                # never touched); credit already spent becomes a debt.
                await QuotaLedger(session).remove_credit(
                    kind, owner, saga.provider, saga.tokens, self.clock.now()
                )

            return await self._move(
                saga,
                COMPENSATING,
                "TokensDeallocated",
                on_commit=deallocate,
                tokens_allocated=False,
            )
        if saga.payment_reserved:
            await self._pay(lambda: self.payments.release(saga.id, saga.tokens))
            return await self._move(saga, COMPENSATING, "PaymentReleased", payment_reserved=False)
        return await self._move(saga, FAILED, "PurchaseFailed", reason=saga.failure_reason)

    async def _retry_later(self, saga: PurchaseSaga, reason: str) -> None:
        attempts = saga.attempts + 1
        now = self.clock.now()
        if attempts >= self.settings.saga_max_attempts and saga.status != COMPENSATING:
            await self._start_compensating(saga, f"gave up after {attempts} attempts: {reason}")
            return
        delay = min(60.0, self.settings.saga_retry_base_seconds * 2 ** min(attempts, 10))
        async with self.db.transaction() as session:
            await SagaRepository(session).move(
                saga.id,
                self.owner,
                saga.status,
                now,
                attempts=attempts,
                next_attempt_at=now + timedelta(seconds=delay),
            )
        log.warning(
            "saga step failed; retrying",
            extra={
                "sagaId": str(saga.id),
                "status": saga.status,
                "attempt": attempts,
                "reason": reason,
            },
        )

    @staticmethod
    def _pool_of(saga: PurchaseSaga) -> tuple[str, uuid.UUID]:
        if saga.org_id is not None:
            return ORG_POOL, saga.org_id
        return USER_POOL, saga.user_id
