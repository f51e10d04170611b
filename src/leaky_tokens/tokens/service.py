"""The token service's rules: quota pools and the consume path of DESIGN.md.

Consume, in order: authorise -> validate -> reserve quota (one conditional UPDATE, plus a
reservation row) -> leaky bucket -> provider call -> settle. Every outcome is settled by deleting
the reservation row in the same transaction as the refund (if any) and its usage event, so a
refund happens at most once whoever settles first (the request, its cancellation handler or the
crash sweeper)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from redis.exceptions import RedisError

from leaky_tokens.settings import PROVIDERS, TokensSettings
from leaky_tokens.shared.clock import Clock
from leaky_tokens.shared.database import Database
from leaky_tokens.shared.errors import Forbidden, ServiceUnavailable
from leaky_tokens.shared.pagination import PageRequest
from leaky_tokens.shared.principal import Principal
from leaky_tokens.tokens.errors import (
    InsufficientQuota,
    QuotaNotFound,
    RateLimited,
    RemainingExceedsTotal,
    TokensExceedCapacity,
    UnknownProvider,
)
from leaky_tokens.tokens.leaky_bucket import BucketConfig, BucketDecision, LeakyBucketStore
from leaky_tokens.tokens.models import TokenPool
from leaky_tokens.tokens.outbox import usage_event
from leaky_tokens.tokens.outbox_repository import Backlog, OutboxRepository
from leaky_tokens.tokens.provider_client import ProviderCallFailed, ProviderClient
from leaky_tokens.tokens.repository import QuotaLedger, SettledReservation, TokensRepository
from leaky_tokens.tokens.session_budget import charge_target

log = logging.getLogger("leaky_tokens.tokens")

USER_POOL = "user"
ORG_POOL = "org"


@dataclass(frozen=True, slots=True)
class ConsumeRequest:
    user_id: uuid.UUID
    org_id: uuid.UUID | None
    provider: str
    tokens: int
    prompt: str | None


@dataclass(frozen=True, slots=True)
class ConsumeResult:
    decision: BucketDecision
    provider_response: dict[str, Any]
    quota_remaining: int
    at: datetime


@dataclass(frozen=True, slots=True)
class QuotaView:
    """A pool as a reader sees it now: an expired window reads as already reset.

    `total_tokens` and `remaining_tokens` keep the plan's meaning over both balances: what the
    pool holds at the start of a window, and what can be spent now (allowance left, then
    credit)."""

    kind: str
    owner_id: uuid.UUID
    provider: str
    allowance_tokens: int  # the periodic allowance, restored at every window reset
    allowance_remaining: int  # of it, left in the current window
    credit_tokens: int  # purchased, never reset, spent after the allowance
    reset_at: datetime
    updated_at: datetime

    @property
    def total_tokens(self) -> int:
        return max(0, self.allowance_tokens + self.credit_tokens)

    @property
    def remaining_tokens(self) -> int:
        return max(0, self.allowance_remaining + self.credit_tokens)


def check_provider(provider: str) -> None:
    if provider not in PROVIDERS:
        message = f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}"
        raise UnknownProvider(message, details=[{"field": "provider", "message": message}])


class TokenService:
    def __init__(
        self,
        database: Database,
        settings: TokensSettings,
        clock: Clock,
        buckets: LeakyBucketStore,
        providers: ProviderClient,
    ) -> None:
        self.db = database
        self.settings = settings
        self.clock = clock
        self.buckets = buckets
        self.providers = providers
        self.window = timedelta(seconds=settings.quota_window_seconds)

    # authorisation
    @staticmethod
    def authorise_user(principal: Principal, user_id: uuid.UUID) -> None:
        if not principal.may_act_for_user(user_id):
            raise Forbidden("you may only use or read your own quota")

    @staticmethod
    def authorise_org(principal: Principal, org_id: uuid.UUID) -> None:
        if not principal.may_act_for_org(org_id):
            raise Forbidden("you are not a member of this organisation")

    def bucket_config(self, principal: Principal, user_id: uuid.UUID) -> BucketConfig:
        multiplier = 1.0
        if principal.user_id == user_id:
            factors = [self.settings.role_multipliers.get(r, 1.0) for r in principal.roles]
            multiplier = max(factors, default=1.0)
        return BucketConfig(
            capacity=max(1, int(self.settings.bucket_capacity * multiplier)),
            leak_per_second=self.settings.bucket_leak_per_second * multiplier,
        )

    # quotas
    def _view(self, pool: TokenPool) -> QuotaView:
        now = self.clock.now()
        expired = pool.reset_at <= now
        return QuotaView(
            pool.owner_kind,
            pool.owner_id,
            pool.provider,
            allowance_tokens=pool.total_tokens,
            allowance_remaining=pool.total_tokens if expired else pool.remaining_tokens,
            credit_tokens=pool.credit_tokens,
            reset_at=now + self.window if expired else pool.reset_at,
            updated_at=pool.updated_at,
        )

    async def get_quota(
        self, principal: Principal, kind: str, owner_id: uuid.UUID, provider: str
    ) -> QuotaView:
        check_provider(provider)
        if kind == USER_POOL:
            self.authorise_user(principal, owner_id)
        else:
            self.authorise_org(principal, owner_id)
        async with self.db.read() as session:
            pool = await TokensRepository(session).pool(kind, owner_id, provider)
        if pool is None:
            raise QuotaNotFound()
        return self._view(pool)

    async def list_quotas(
        self,
        principal: Principal,
        page: PageRequest,
        *,
        user_id: uuid.UUID | None = None,
        org_id: uuid.UUID | None = None,
    ) -> tuple[list[QuotaView], int]:
        """The pools the caller may read: a USER's own and their organisations' (narrowed by
        `user_id` / `org_id`, each of which must be theirs); an ADMIN's pick, else every pool."""
        if user_id is not None:
            self.authorise_user(principal, user_id)
        if org_id is not None:
            self.authorise_org(principal, org_id)
        owners: list[tuple[str, uuid.UUID]] | None
        if user_id is not None or org_id is not None:
            owners = [(USER_POOL, user_id)] if user_id is not None else []
            if org_id is not None:
                owners.append((ORG_POOL, org_id))
        elif principal.is_admin:
            owners = None
        else:
            owners = [(USER_POOL, principal.user_id)]
            owners += [(ORG_POOL, org) for org in sorted(principal.org_ids)]
        async with self.db.read() as session:
            pools, total = await TokensRepository(session).pools_page(
                owners, page.offset, page.page_size
            )
        return [self._view(pool) for pool in pools], total

    async def outbox_backlog(self, principal: Principal) -> Backlog:
        """ADMIN: the usage and purchase events not yet handed to analytics' transport."""
        if not principal.is_admin:
            raise Forbidden("only an ADMIN may read the event pipeline's state")
        async with self.db.read() as session:
            return await OutboxRepository(session).backlog()

    async def set_quota(
        self,
        principal: Principal,
        kind: str,
        owner_id: uuid.UUID,
        provider: str,
        *,
        total: int,
        remaining: int | None,
        reset_at: datetime | None,
    ) -> QuotaView:
        if not principal.is_admin:
            raise Forbidden("only an ADMIN may set quotas")
        return await self.put_quota(
            kind, owner_id, provider, total=total, remaining=remaining, reset_at=reset_at
        )

    async def put_quota(
        self,
        kind: str,
        owner_id: uuid.UUID,
        provider: str,
        *,
        total: int,
        remaining: int | None,
        reset_at: datetime | None,
    ) -> QuotaView:
        """Create or replace a pool (admin API and CLI)."""
        check_provider(provider)
        if remaining is not None and remaining > total:
            message = f"remainingTokens ({remaining}) must not exceed totalTokens ({total})"
            raise RemainingExceedsTotal(
                message, details=[{"field": "remainingTokens", "message": message}]
            )
        now = self.clock.now()
        async with self.db.transaction() as session:
            pool = await TokensRepository(session).upsert_pool(
                kind,
                owner_id,
                provider,
                total=total,
                remaining=total if remaining is None else remaining,
                reset_at=reset_at or now + self.window,
                now=now,
            )
        return self._view(pool)

    # consumption
    async def consume_tokens(
        self, principal: Principal, request: ConsumeRequest, request_id: str | None
    ) -> ConsumeResult:
        self.authorise_user(principal, request.user_id)
        if request.org_id is not None:
            self.authorise_org(principal, request.org_id)
        check_provider(request.provider)
        config = self.bucket_config(principal, request.user_id)
        if request.tokens > config.capacity:
            message = (
                f"tokens ({request.tokens}) exceed the rate-limit capacity ({config.capacity}); "
                "split the request"
            )
            raise TokensExceedCapacity(message, details=[{"field": "tokens", "message": message}])

        # A session credential's calls are charged to its session's budget (issue 13).
        kind, owner, pool_provider = charge_target(
            principal, request.org_id, request.user_id, request.provider
        )
        now = self.clock.now()
        reservation_id = uuid.uuid4()
        event_fields: dict[str, Any] = {
            "user_id": request.user_id,
            "org_id": request.org_id,
            "provider": request.provider,
            "tokens": request.tokens,
            "request_id": request_id,
        }
        async with self.db.connection() as conn:
            repo = QuotaLedger(conn)
            reserved = await repo.reserve(
                kind,
                owner,
                pool_provider,
                at_least=request.tokens,
                at_most=request.tokens,
                now=now,
                window=self.window,
            )
            if reserved is None:
                await repo.add_event(usage_event("QUOTA_INSUFFICIENT", now=now, **event_fields))
            else:
                await repo.add_reservation(
                    reserved.reservation(
                        reservation_id,
                        user_id=request.user_id,
                        org_id=request.org_id,
                        provider=request.provider,
                        request_id=request_id,
                        now=now,
                        expires_at=now + timedelta(seconds=self.settings.reservation_ttl_seconds),
                    )
                )
        if reserved is None:
            raise InsufficientQuota()

        bucket_key = f"{request.user_id}:{request.provider}"
        settled = False
        try:
            try:
                decision = await self.buckets.acquire(bucket_key, request.tokens, config)
            except RedisError as exc:
                raise ServiceUnavailable("rate limiter unavailable") from exc
            if not decision.allowed:
                settled = await self._release(
                    reservation_id,
                    "RATE_LIMITED",
                    event_fields,
                    {"waitSeconds": decision.wait_seconds},
                )
                raise RateLimited(
                    extra=rate_limited_body(decision),
                    headers=rate_limit_headers(decision, self.clock.now()),
                )
            try:
                answer = await self.providers.chat(
                    request.provider,
                    {"prompt": request.prompt or "", "userId": str(request.user_id)},
                )
            except ProviderCallFailed as exc:
                with contextlib.suppress(RedisError):
                    await self.buckets.release(bucket_key, request.tokens, config)
                settled = await self._release(
                    reservation_id, "PROVIDER_FAILURE", event_fields, {"reason": exc.reason}
                )
                raise
            settled = await self._commit(reservation_id, event_fields, answer)
            return ConsumeResult(decision, answer, reserved.remaining_tokens, self.clock.now())
        finally:
            if not settled:
                # Cancelled or failed mid-flight: give the tokens back now; if even this is cut
                # short, the sweeper refunds the expired reservation later.
                await asyncio.shield(self._release(reservation_id, "ABANDONED", event_fields, {}))

    async def _release(
        self,
        reservation_id: uuid.UUID,
        decision: str,
        event_fields: dict[str, Any],
        extra: dict[str, Any],
    ) -> bool:
        now = self.clock.now()
        async with self.db.connection() as conn:
            repo = QuotaLedger(conn)
            settled = await repo.settle(reservation_id, 0, now)
            if settled is None:
                return True  # someone else (the sweeper) settled it already
            await repo.add_event(
                usage_event(
                    decision, now=now, **event_fields, extra={**extra, **_refund_fields(settled)}
                )
            )
        return True

    async def _commit(
        self, reservation_id: uuid.UUID, event_fields: dict[str, Any], answer: dict[str, Any]
    ) -> bool:
        now = self.clock.now()
        async with self.db.connection() as conn:
            repo = QuotaLedger(conn)
            settled = await repo.settle(reservation_id, event_fields["tokens"], now)
            extra: dict[str, Any] = {"providerResponseId": answer.get("id")}
            if settled is None:
                log.warning("reservation %s was swept before its commit", reservation_id)
            else:
                extra.update(_split_fields(settled))
            await repo.add_event(usage_event("ALLOWED", now=now, **event_fields, extra=extra))
        return True

    async def sweep_expired_reservations(self, limit: int = 200) -> int:
        """Refund reservations whose consume never settled (a crash); safe on many replicas."""
        async with self.db.connection() as conn:
            expired = await QuotaLedger(conn).expired_reservations(self.clock.now(), limit)
        swept = 0
        for reservation_id in expired:
            now = self.clock.now()
            async with self.db.connection() as conn:
                repo = QuotaLedger(conn)
                settled = await repo.settle(reservation_id, 0, now)
                if settled is None:
                    continue
                await repo.add_event(
                    usage_event(
                        "ABANDONED",
                        user_id=settled.user_id,
                        org_id=settled.org_id,
                        provider=settled.provider,
                        tokens=settled.reserved,
                        now=now,
                        request_id=settled.request_id,
                        extra={
                            **_refund_fields(settled),
                            "sweptReservation": str(reservation_id),
                        },
                    )
                )
                swept += 1
        return swept


def _split_fields(settled: SettledReservation) -> dict[str, Any]:
    """Which balance paid for what was used (usage events carry it for analytics)."""
    return {"allowanceTokens": settled.used_allowance, "creditTokens": settled.used_credit}


def _refund_fields(settled: SettledReservation) -> dict[str, Any]:
    # `refunded`: everything reserved went back (false when the window reset in between and
    # the allowance part was dropped, as the new window started full).
    return {
        "refunded": settled.allowance_refund_dropped == 0,
        "refundedTokens": settled.refunded,
    }


def rate_limited_body(decision: BucketDecision) -> dict[str, Any]:
    return {
        "allowed": False,
        "capacity": decision.capacity,
        "used": decision.used,
        "remaining": decision.remaining,
        "waitSeconds": round(decision.wait_seconds, 3),
        "retryAfterSeconds": max(1, int(-(-decision.wait_seconds // 1))),
        "providerResponse": {},
    }


def rate_limit_headers(decision: BucketDecision, now: datetime) -> dict[str, str]:
    headers = {
        "X-RateLimit-Limit": str(decision.capacity),
        "X-RateLimit-Remaining": str(decision.remaining),
        "X-RateLimit-Reset": str(int(now.timestamp() + decision.reset_seconds + 0.999)),
    }
    if not decision.allowed:
        headers["Retry-After"] = str(max(1, int(-(-decision.wait_seconds // 1))))
    return headers
