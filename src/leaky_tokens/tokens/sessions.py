"""Agent sessions' budgets (issue 13): created once per idempotency key, activated by moving
the budget out of the owner's pool into the session's own pool, ended (terminated or expired)
by giving back what is left, exactly once.

Invariants (ARCHITECTURE.md, sessions):
* The budget moves in the same transaction as the status change that causes it (activation:
  pending -> active; end: active -> terminated | expired), and the status change is a
  conditional UPDATE, so the budget moves once whatever runs concurrently or is retried.
* Calls through the session reserve from the session's pool like any other pool, so they can
  never spend more than the budget.
* A call still in flight when the session ends settles into the session's pool afterwards; the
  sweeper gives such late tokens back too, so every token ends where it came from.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson

from leaky_tokens.settings import TokensSettings
from leaky_tokens.shared.clock import Clock
from leaky_tokens.shared.database import Database
from leaky_tokens.shared.errors import AppError, Conflict, Forbidden, InvalidRequest, NotFound
from leaky_tokens.shared.pagination import PageRequest
from leaky_tokens.shared.principal import Principal
from leaky_tokens.tokens.errors import IdempotencyConflict
from leaky_tokens.tokens.models import AgentSession, AgentSessionEvent
from leaky_tokens.tokens.purchase_saga import clean_idempotency_key
from leaky_tokens.tokens.repository import QuotaLedger
from leaky_tokens.tokens.session_budget import (
    ORG_POOL,
    SESSION_POOL,
    SESSION_POOL_PROVIDER,
    USER_POOL,
)
from leaky_tokens.tokens.session_repository import (
    ACTIVE,
    CLOSED,
    EXPIRED,
    FAILED,
    PENDING,
    TERMINATED,
    SessionRepository,
)

log = logging.getLogger("leaky_tokens.tokens.sessions")

_EVERYTHING = 2**62  # "all of it" for a reservation's at_most


class SessionNotFound(NotFound):
    code = "SESSION_NOT_FOUND"
    default_message = "session not found"


class SessionNotActive(Conflict):
    code = "SESSION_NOT_ACTIVE"
    default_message = "the session is not active"


class SessionEnded(Forbidden):
    default_message = "this agent session has ended; its credential spends nothing more"


class InsufficientBalance(AppError):
    status = 402
    code = "INSUFFICIENT_BALANCE"
    default_message = "the pool cannot cover the session's budget"


class SessionCredentialForbidden(Forbidden):
    default_message = "an agent session's credential may only spend its budget"


@dataclass(frozen=True)
class SessionSpec:
    idempotency_key: str | None
    product_no: str
    product_type: str
    model: str
    provider: str
    token_budget: int
    lifetime_seconds: int
    org_id: uuid.UUID | None = None

    def digest(self, user_id: uuid.UUID) -> str:
        canonical = {
            "userId": str(user_id),
            "orgId": str(self.org_id) if self.org_id else None,
            "productNo": self.product_no,
            "tokenBudget": self.token_budget,
            "lifetimeSeconds": self.lifetime_seconds,
        }
        return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True)
class SessionView:
    session: AgentSession
    budget_left: int  # unreserved tokens in the session's pool (0 once ended)
    in_flight: int  # reserved by calls not yet settled

    @property
    def spent(self) -> int:
        s = self.session
        if s.status in (PENDING, FAILED):
            return 0
        returned = s.returned_credit + s.returned_allowance + s.returned_dropped
        return max(0, s.token_budget - self.budget_left - self.in_flight - returned)


@dataclass(frozen=True)
class EventSpec:
    source: str
    outcome: str
    status_code: int | None = None
    latency_ms: int | None = None
    error_kind: str | None = None
    message: str | None = None


class AgentSessionService:
    def __init__(self, database: Database, settings: TokensSettings, clock: Clock) -> None:
        self.db = database
        self.settings = settings
        self.clock = clock

    @staticmethod
    def _manager(principal: Principal) -> None:
        if principal.session_id is not None:
            raise SessionCredentialForbidden()

    @staticmethod
    def _owner_filter(principal: Principal) -> uuid.UUID | None:
        return None if principal.is_admin else principal.user_id

    async def _view(self, repo: SessionRepository, session: AgentSession) -> SessionView:
        left, in_flight = await repo.budget_state(session.id)
        return SessionView(session, left, in_flight)

    async def _load(
        self, repo: SessionRepository, principal: Principal, session_id: uuid.UUID
    ) -> AgentSession:
        # A session credential sees only its own session; another user's session is not found.
        if principal.session_id is not None and principal.session_id != session_id:
            raise SessionNotFound()
        found = await repo.of_user(self._owner_filter(principal), session_id)
        if found is None:
            raise SessionNotFound()
        return found

    # creation and activation
    async def create_session(
        self, principal: Principal, spec: SessionSpec
    ) -> tuple[SessionView, bool]:
        """The session for this request: (view, True) when new, (view, False) when the same
        key and body were seen before; a key reused with another body is a 409."""
        self._manager(principal)
        if spec.org_id is not None and not principal.may_act_for_org(spec.org_id):
            raise Forbidden("you are not a member of that organisation")
        key = clean_idempotency_key(spec.idempotency_key)
        if spec.token_budget < 1:
            raise InvalidRequest("tokenBudget must be at least 1")
        now = self.clock.now()
        digest = spec.digest(principal.user_id)
        kind, owner = (ORG_POOL, spec.org_id) if spec.org_id else (USER_POOL, principal.user_id)
        row = AgentSession(
            id=uuid.uuid4(),
            user_id=principal.user_id,
            idempotency_key=key,
            request_hash=digest,
            product_no=spec.product_no,
            product_type=spec.product_type,
            model=spec.model,
            provider=spec.provider,
            status=PENDING,
            token_budget=spec.token_budget,
            funding_kind=kind,
            funding_owner_id=owner,
            funding_provider=spec.provider,
            funded_allowance=0,
            funded_credit=0,
            funded_reset_at=None,
            returned_credit=0,
            returned_allowance=0,
            returned_dropped=0,
            credential=None,
            credential_key_id=None,
            rotations=0,
            failure_code=None,
            close_reason=None,
            expires_at=now + timedelta(seconds=spec.lifetime_seconds),
            created_at=now,
            activated_at=None,
            closed_at=None,
            updated_at=now,
        )
        async with self.db.transaction() as session:
            repo = SessionRepository(session)
            if await repo.insert_if_absent(row):
                return SessionView(row, 0, 0), True
            assert key is not None
            existing = await repo.by_key(principal.user_id, key)
            assert existing is not None
            if existing.request_hash != digest:
                raise IdempotencyConflict(
                    "Idempotency-Key was already used for a different session request"
                )
            return await self._view(repo, existing), False

    async def activate_session(
        self,
        principal: Principal,
        session_id: uuid.UUID,
        credential: str,
        credential_key_id: uuid.UUID,
    ) -> tuple[SessionView, bool]:
        """Move the budget into the session's pool and attach its credential. (view, True) for
        the activation that did it; (view, False) when the session was no longer pending (a
        concurrent creation with the same key won, or it failed): the caller revokes its own
        credential. Not enough in the owner's pool: the session fails, INSUFFICIENT_BALANCE."""
        self._manager(principal)
        now = self.clock.now()
        async with self.db.transaction() as session:
            repo = SessionRepository(session)
            current = await self._load(repo, principal, session_id)
            if current.status != PENDING:
                return await self._view(repo, current), False
            if current.expires_at <= now:
                await repo.change(
                    session_id,
                    (PENDING,),
                    status=EXPIRED,
                    closed_at=now,
                    close_reason="expired before activation",
                    updated_at=now,
                )
                return await self._view(repo, await self._load(repo, principal, session_id)), False
            won = await repo.change(
                session_id,
                (PENDING,),
                status=ACTIVE,
                credential=credential,
                credential_key_id=credential_key_id,
                activated_at=now,
                updated_at=now,
            )
            if not won:
                return await self._view(repo, await self._load(repo, principal, session_id)), False
            reserved = await QuotaLedger(session).reserve(
                current.funding_kind,
                current.funding_owner_id,
                current.funding_provider,
                at_least=current.token_budget,
                at_most=current.token_budget,
                now=now,
                window=timedelta(seconds=self.settings.quota_window_seconds),
            )
            if reserved is None:
                await repo.change(
                    session_id,
                    (ACTIVE,),
                    status=FAILED,
                    failure_code=InsufficientBalance.code,
                    credential=None,
                    closed_at=now,
                    updated_at=now,
                )
                failed = True
            else:
                await repo.change(
                    session_id,
                    (ACTIVE,),
                    funded_allowance=reserved.from_allowance,
                    funded_credit=reserved.from_credit,
                    funded_reset_at=reserved.reset_at,
                )
                await repo.open_pool(session_id, current.token_budget, now)
                failed = False
            view = await self._view(repo, await self._load(repo, principal, session_id))
        if failed:
            raise InsufficientBalance(
                f"your {current.funding_provider} pool cannot cover a budget of "
                f"{current.token_budget} tokens",
                extra={"sessionId": str(session_id)},
            )
        return view, True

    # calls through a session
    async def model_for_call(self, principal: Principal) -> str:
        """The model a session credential's /v1 call goes to: the session's current one."""
        assert principal.session_id is not None
        async with self.db.read() as session:
            found = await SessionRepository(session).of_user(
                principal.user_id, principal.session_id
            )
        if found is None or found.status != ACTIVE:
            raise SessionEnded()
        return found.model

    # reading
    async def get_session(self, principal: Principal, session_id: uuid.UUID) -> SessionView:
        async with self.db.read() as session:
            repo = SessionRepository(session)
            return await self._view(repo, await self._load(repo, principal, session_id))

    async def list_sessions(
        self, principal: Principal, page: PageRequest, status: str | None
    ) -> tuple[list[SessionView], int]:
        self._manager(principal)
        async with self.db.read() as session:
            repo = SessionRepository(session)
            rows, total = await repo.page(principal.user_id, status, page.offset, page.page_size)
            return [await self._view(repo, row) for row in rows], total

    # the end
    async def close_session(
        self, principal: Principal | None, session_id: uuid.UUID, *, expired: bool, reason: str
    ) -> SessionView:
        """End the session and give back what is left (idempotent: an ended session is
        returned as it is). `principal` None: the sweeper."""
        if principal is not None:
            self._manager(principal)
        now = self.clock.now()
        status = EXPIRED if expired else TERMINATED
        async with self.db.transaction() as session:
            repo = SessionRepository(session)
            if principal is None:
                current = await repo.of_user(None, session_id)
                if current is None:
                    raise SessionNotFound()
            else:
                current = await self._load(repo, principal, session_id)
            values = {"status": status, "closed_at": now, "close_reason": reason, "updated_at": now}
            if await repo.change(session_id, (ACTIVE,), **values):
                await self._give_back(repo, session_id, now)
            else:
                await repo.change(session_id, (PENDING,), **values)
            return await self._view(repo, await repo.of_user(None, session_id) or current)

    async def _give_back(
        self, repo: SessionRepository, session_id: uuid.UUID, now: datetime
    ) -> int:
        """Move everything unreserved in the session's pool back to the pool it came from.
        Runs after a status change on the session row in the same transaction (the row is
        locked, so two of these never interleave on one session)."""
        row = await repo.of_user(None, session_id)
        assert row is not None
        taken = await QuotaLedger(repo.session).reserve(
            SESSION_POOL,
            session_id,
            SESSION_POOL_PROVIDER,
            at_least=1,
            at_most=_EVERYTHING,
            now=now,
            window=timedelta(days=36500),
        )
        if taken is None:
            return 0
        amount = taken.reserved
        credit_back = min(amount, max(0, row.funded_credit - row.returned_credit))
        allowance_back = amount - credit_back
        applied = await repo.give_back(
            row.funding_kind,
            row.funding_owner_id,
            row.funding_provider,
            credit=credit_back,
            allowance=allowance_back,
            reset_at=row.funded_reset_at,
            now=now,
        )
        await repo.change(
            session_id,
            CLOSED,
            returned_credit=row.returned_credit + credit_back,
            returned_allowance=row.returned_allowance + (allowance_back if applied else 0),
            returned_dropped=row.returned_dropped + (0 if applied else allowance_back),
            updated_at=now,
        )
        return amount

    async def sweep(self, limit: int = 100) -> tuple[int, int]:
        """Expire sessions past their lifetime and give back tokens that settled into ended
        sessions' pools; safe on many replicas. (expired, late returns)."""
        now = self.clock.now()
        async with self.db.read() as session:
            repo = SessionRepository(session)
            due = await repo.due_to_expire(now, limit)
            late = await repo.closed_with_budget_left(limit)
        for session_id in due:
            await self.close_session(None, session_id, expired=True, reason="lifetime over")
        returned = 0
        for session_id in late:
            now = self.clock.now()
            async with self.db.transaction() as session:
                repo = SessionRepository(session)
                # Lock the row first (a no-op change), as a close does.
                if await repo.change(session_id, CLOSED, updated_at=now):
                    returned += 1 if await self._give_back(repo, session_id, now) else 0
        return len(due), returned

    # rotation and events
    async def rotate_session(
        self,
        principal: Principal,
        session_id: uuid.UUID,
        *,
        expected_key_id: uuid.UUID | None,
        model: str,
        provider: str,
        credential: str,
        credential_key_id: uuid.UUID,
        reason: str,
    ) -> tuple[SessionView, AgentSession]:
        """Swap in a new credential (and model) iff the old one is still `expected_key_id`.
        Returns (the view after, the row before) so the caller revokes the old credential."""
        self._manager(principal)
        now = self.clock.now()
        async with self.db.transaction() as session:
            repo = SessionRepository(session)
            before = await self._load(repo, principal, session_id)
            if before.status != ACTIVE:
                raise SessionNotActive(f"the session is {before.status}")
            snapshot = AgentSession(
                **{c.key: getattr(before, c.key) for c in AgentSession.__table__.columns}
            )
            swapped = await repo.swap_credential(
                session_id,
                expected_key_id,
                model=model,
                provider=provider,
                credential=credential,
                credential_key_id=credential_key_id,
                updated_at=now,
            )
            if not swapped:
                raise SessionNotActive("the session was rotated or ended meanwhile; try again")
            await repo.add_event(
                AgentSessionEvent(
                    session_id=session_id,
                    source="rotation",
                    outcome="rotated",
                    message=reason[:500],
                    detail={
                        "fromModel": snapshot.model,
                        "toModel": model,
                        "fromProvider": snapshot.provider,
                        "toProvider": provider,
                        "reason": reason[:500],
                    },
                    created_at=now,
                )
            )
            view = await self._view(repo, await self._load(repo, principal, session_id))
        return view, snapshot

    async def record_event(
        self, principal: Principal, session_id: uuid.UUID, spec: EventSpec
    ) -> AgentSessionEvent:
        """An agent's report (any source) or the gateway's observation (through the session's
        own credential)."""
        async with self.db.transaction() as session:
            repo = SessionRepository(session)
            await self._load(repo, principal, session_id)
            event = AgentSessionEvent(
                session_id=session_id,
                source=spec.source,
                outcome=spec.outcome,
                status_code=spec.status_code,
                latency_ms=spec.latency_ms,
                error_kind=spec.error_kind,
                message=spec.message[:500] if spec.message else None,
                detail=None,
                created_at=self.clock.now(),
            )
            await repo.add_event(event)
        return event

    async def recent_events(
        self, principal: Principal, session_id: uuid.UUID, limit: int
    ) -> tuple[SessionView, list[AgentSessionEvent]]:
        async with self.db.read() as session:
            repo = SessionRepository(session)
            view = await self._view(repo, await self._load(repo, principal, session_id))
            return view, list(await repo.recent_events(session_id, limit))

    async def stats(self, principal: Principal) -> dict[str, Any]:
        self._manager(principal)
        async with self.db.read() as session:
            repo = SessionRepository(session)
            counts = await repo.status_counts(principal.user_id)
            live_left = await repo.live_budget_left(principal.user_id)
        return {"byStatus": counts, "activeBudgetLeft": live_left}
