"""The auth service's rules: accounts, logins, API keys, organisations and signing keys."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from leaky_tokens.auth import api_keys
from leaky_tokens.auth.errors import (
    AlreadyMember,
    ApiKeyNotFound,
    CannotRemoveOwner,
    EmailTaken,
    InvalidCredentials,
    LoginThrottled,
    NotOrgOwner,
    OrgNotFound,
    TooManyApiKeys,
    UsernameTaken,
    UserNotFound,
    WeakPassword,
)
from leaky_tokens.auth.jwt_tokens import KeyRing, generate_key_material, reencrypted_pem
from leaky_tokens.auth.models import ApiKey, Organization, OrgMember, User
from leaky_tokens.auth.passwords import Passwords
from leaky_tokens.auth.repository import AuthRepository, DuplicateUser
from leaky_tokens.settings import AuthSettings
from leaky_tokens.shared.clock import Clock
from leaky_tokens.shared.database import Database
from leaky_tokens.shared.errors import (
    ExpiredApiKey,
    Forbidden,
    InvalidApiKey,
    InvalidRequest,
    RevokedApiKey,
)
from leaky_tokens.shared.jwt_verify import principal_from_claims
from leaky_tokens.shared.pagination import PageRequest
from leaky_tokens.shared.principal import ADMIN, USER, Principal
from leaky_tokens.shared.rate_limit import FixedWindowLimiter, Policy

OWNER = "OWNER"
MEMBER = "MEMBER"

log = logging.getLogger("leaky_tokens.auth")

_FEED_RECHECK_SECONDS = 0.25  # a long poll re-reads the feed this often (other replicas' news)


@dataclass(frozen=True)
class IssuedSession:
    user: User
    token: str


@dataclass(frozen=True)
class ValidatedKey:
    key: ApiKey
    user: User
    org_ids: list[uuid.UUID]


class AuthService:
    def __init__(
        self,
        database: Database,
        settings: AuthSettings,
        clock: Clock,
        throttle: FixedWindowLimiter,
    ) -> None:
        self.db = database
        self.settings = settings
        self.clock = clock
        self.throttle = throttle
        # Told (seq, key id) after a revocation commits, e.g. to publish it on Redis; the feed
        # (`revocations_after`) has it either way.
        self.announce_revocation: Callable[[int, uuid.UUID], Awaitable[None]] | None = None
        # Set (and replaced) on each revocation here, waking followers waiting on the feed.
        self._revoked_here = asyncio.Event()
        self._passphrase = settings.signing_passphrase()
        self.keys = KeyRing(settings.jwt_issuer, settings.jwt_ttl_seconds, self._passphrase)
        self.passwords = Passwords(
            settings.argon2_time_cost, settings.argon2_memory_kib, settings.argon2_parallelism
        )

    # signing keys
    async def ensure_signing_key(self) -> None:
        """Create the first key, rotate a stale one, and load the ring (idempotent)."""
        max_age = timedelta(days=self.settings.signing_key_rotation_days)
        async with self.db.transaction() as session:
            repo = AuthRepository(session)
            await repo.lock_signing_keys()
            if self._passphrase is not None:
                # Keys written before a passphrase was configured are sealed now.
                for row in await repo.plain_signing_keys():
                    row.private_pem = reencrypted_pem(row.private_pem, self._passphrase)
                await session.flush()
            newest = await repo.newest_signing_keys(1)
            now = self.clock.now()
            if not newest or now - newest[0].created_at >= max_age:
                await repo.add_signing_key(generate_key_material(now, self._passphrase))
        await self.reload_signing_keys()

    async def rotate_signing_key_for(self, principal: Principal) -> str:
        """Rotation requested over HTTP: ADMIN only (the CLI calls rotate_signing_key itself)."""
        if not principal.is_admin:
            raise Forbidden("only an ADMIN may rotate signing keys")
        return await self.rotate_signing_key()

    async def rotate_signing_key(self) -> str:
        async with self.db.transaction() as session:
            repo = AuthRepository(session)
            await repo.lock_signing_keys()
            newest = await repo.newest_signing_keys(1)
            now = self.clock.now()
            # Keys are ranked by creation time: the new one must sort first even when this
            # replica's clock lags the one that made the previous key, or has not moved since.
            if newest and now <= newest[0].created_at:
                now = newest[0].created_at + timedelta(microseconds=1)
            material = generate_key_material(now, self._passphrase)
            await repo.add_signing_key(material)
        await self.reload_signing_keys()
        return material.kid

    async def reload_signing_keys(self) -> None:
        async with self.db.read() as session:
            self.keys.load(await AuthRepository(session).newest_signing_keys(2))

    # accounts
    def _check_password_policy(self, password: str) -> None:
        minimum = self.settings.password_min_length
        if len(password) < minimum:
            message = f"password must be at least {minimum} characters"
            raise WeakPassword(message, details=[{"field": "password", "message": message}])

    async def create_user(
        self, username: str, email: str, password: str, *, admin: bool = False
    ) -> User:
        self._check_password_policy(password)
        password_hash = await self.passwords.hash(password)
        now = self.clock.now()
        user = User(
            id=uuid.uuid4(),
            username=username,
            username_lower=username.lower(),
            email=email,
            email_lower=email.lower(),
            password_hash=password_hash,
            roles=[USER, ADMIN] if admin else [USER],
            created_at=now,
            updated_at=now,
        )
        async with self.db.transaction() as session:
            repo = AuthRepository(session)
            taken = await repo.taken_field(username, email)
            if taken:
                raise UsernameTaken() if taken == "username" else EmailTaken()
            try:
                await repo.add_user(user)
            except DuplicateUser as exc:  # lost a race with a concurrent registration
                raise (UsernameTaken() if exc.field == "username" else EmailTaken()) from exc
        return user

    async def register(self, username: str, email: str, password: str) -> IssuedSession:
        user = await self.create_user(username, email, password)
        return IssuedSession(user, self._issue(user, []))

    async def ensure_admin(self, username: str, email: str, password: str) -> User:
        """Bootstrap an ADMIN from settings: create it, or grant ADMIN to the existing account
        when the configured password is that account's own."""
        async with self.db.transaction() as session:
            repo = AuthRepository(session)
            existing = await repo.user_by_username(username)
            if existing is not None:
                if ADMIN not in existing.roles:
                    # Anyone may have registered the name before it was configured: only the
                    # holder of the configured password proves the account is the operator's.
                    if not await self.passwords.verify(existing.password_hash, password):
                        log.error(
                            "not granting ADMIN to existing account %r: its password is not the "
                            "configured admin password",
                            username,
                        )
                        return existing
                    await repo.set_roles(existing, [*existing.roles, ADMIN], self.clock.now())
                return existing
        return await self.create_user(username, email, password, admin=True)

    async def login(self, username: str, password: str, client: str) -> IssuedSession:
        settings = self.settings
        window = settings.login_failure_window_seconds
        account = (
            username.lower(),
            Policy("login:acct", settings.login_max_failures_per_account, window),
        )
        by_client = (client, Policy("login:client", settings.login_max_failures_per_client, window))
        for key, policy in (account, by_client):
            failures = await self.throttle.peek(key, policy)
            if not failures.allowed:
                retry = failures.retry_after
                raise LoginThrottled(
                    headers={"Retry-After": str(retry)}, extra={"retryAfterSeconds": retry}
                )
        async with self.db.read() as session:
            repo = AuthRepository(session)
            user = await repo.user_by_username(username)
            org_ids = await repo.org_ids_of(user.id) if user else []
        if not await self.passwords.verify(user.password_hash if user else None, password):
            await self.throttle.hit([account])
            await self.throttle.hit([by_client])
            raise InvalidCredentials()
        assert user is not None
        await self.throttle.clear(*account)
        return IssuedSession(user, self._issue(user, org_ids))

    def _issue(self, user: User, org_ids: list[uuid.UUID]) -> str:
        return self.keys.issue(
            user_id=user.id,
            username=user.username,
            roles=list(user.roles),
            org_ids=org_ids,
            now=self.clock.now(),
        )

    def principal_from_bearer(self, token: str) -> Principal:
        return principal_from_claims(self.keys.verify(token))

    # API keys
    @staticmethod
    def _authorise_for(principal: Principal, user_id: uuid.UUID) -> None:
        if not principal.may_act_for_user(user_id):
            raise Forbidden("you may only manage your own API keys")

    async def create_api_key(
        self,
        principal: Principal,
        user_id: uuid.UUID,
        name: str,
        expires_at: datetime | None,
        org_id: uuid.UUID | None = None,
        session_id: uuid.UUID | None = None,
    ) -> tuple[ApiKey, str]:
        """`org_id`: a key for that organisation, whose owner must be a member of it."""
        self._authorise_for(principal, user_id)
        if principal.session_id is not None:
            # A session's credential spends its budget; it never mints credentials.
            raise Forbidden("an agent session's credential cannot create API keys")
        now = self.clock.now()
        if expires_at is not None and expires_at <= now:
            raise InvalidRequest(
                "expiresAt must be in the future",
                details=[{"field": "expiresAt", "message": "must be in the future"}],
            )
        raw = api_keys.new_raw_key(user_id)
        key = ApiKey(
            id=uuid.uuid4(),
            user_id=user_id,
            name=name,
            key_hash=api_keys.hash_key(raw),
            key_prefix=api_keys.display_prefix(raw),
            created_at=now,
            expires_at=expires_at,
            revoked_at=None,
            org_id=org_id,
            session_id=session_id,
        )
        cap = self.settings.max_active_api_keys_per_user
        async with self.db.transaction() as session:
            repo = AuthRepository(session)
            # Counted under the user's row lock: concurrent creations cannot pass the cap.
            if await repo.lock_user(user_id) is None:
                raise UserNotFound()
            if org_id is not None and await repo.membership(org_id, user_id) is None:
                raise OrgNotFound()  # not theirs: as if it did not exist (contract 10)
            if await repo.count_active_api_keys(user_id, now) >= cap:
                raise TooManyApiKeys(f"at most {cap} active API keys per user; revoke one first")
            await repo.add_api_key(key)
        return key, raw

    async def list_api_keys(
        self, principal: Principal, user_id: uuid.UUID, page: PageRequest
    ) -> tuple[list[ApiKey], int]:
        self._authorise_for(principal, user_id)
        async with self.db.read() as session:
            keys, total = await AuthRepository(session).api_keys_page(
                user_id, page.offset, page.page_size
            )
        return list(keys), total

    async def revoke_api_key(
        self, principal: Principal, user_id: uuid.UUID, key_id: uuid.UUID
    ) -> ApiKey:
        self._authorise_for(principal, user_id)
        seq: int | None = None
        async with self.db.transaction() as session:
            repo = AuthRepository(session)
            key = await repo.api_key_of_user(user_id, key_id)
            if key is None:
                raise ApiKeyNotFound()
            if key.revoked_at is None:
                key.revoked_at = self.clock.now()
                await session.flush()
                seq = await repo.add_revocation(key.id, key.revoked_at)
        if seq is not None:
            self._revoked_here.set()
            self._revoked_here = asyncio.Event()
        if seq is not None and self.announce_revocation is not None:
            try:
                await self.announce_revocation(seq, key.id)
            except Exception:
                # Committed already; followers of the feed still learn it at their next poll.
                log.exception("could not announce the revocation of API key %s", key.id)
        return key

    async def revocations_after(
        self,
        seq: int | None,
        limit: int,
        *,
        wait_seconds: float = 0.0,
        gone: Callable[[], Awaitable[bool]] | None = None,
    ) -> tuple[int, list[uuid.UUID], bool]:
        """(cursor, key ids revoked after `seq`, more to come). Without `seq`: only the current
        cursor, for a follower that starts now. A cursor below `seq` tells the follower the feed
        is not the one it was following (a fresh database).

        With `wait_seconds`, an empty answer is held back until a revocation comes (at once
        for one made on this replica; others are read from the database every quarter second),
        the time is up, or the follower is `gone`: a long poll, so followers learn of a
        revocation at once without asking many times a second."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        while True:
            signal = self._revoked_here
            found = await self._revocations_after(seq, limit)
            left = deadline - loop.time()
            if found[1] or seq is None or left <= 0 or (gone is not None and await gone()):
                return found
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, _FEED_RECHECK_SECONDS)):
                    await signal.wait()

    async def _revocations_after(
        self, seq: int | None, limit: int
    ) -> tuple[int, list[uuid.UUID], bool]:
        async with self.db.read() as session:
            repo = AuthRepository(session)
            if seq is None:
                return await repo.last_revocation_seq(), [], False
            rows = await repo.revocations_after(seq, limit + 1)
            if not rows:
                return min(seq, await repo.last_revocation_seq()), [], False
        more = len(rows) > limit
        rows = rows[:limit]
        cursor = rows[-1][0] if rows else seq
        return cursor, [key_id for _, key_id in rows], more

    async def validate_api_key(self, raw_key: str) -> ValidatedKey:
        if not api_keys.looks_like_key(raw_key):
            raise InvalidApiKey()
        async with self.db.read() as session:
            repo = AuthRepository(session)
            key = await repo.api_key_by_hash(api_keys.hash_key(raw_key))
            if key is None:
                raise InvalidApiKey()
            if key.revoked_at is not None:
                raise RevokedApiKey()
            if key.expires_at is not None and key.expires_at <= self.clock.now():
                raise ExpiredApiKey()
            user = await repo.user_by_id(key.user_id)
            if user is None:
                raise InvalidApiKey()
            org_ids = await repo.org_ids_of(user.id)
        if key.org_id is not None and key.org_id not in org_ids:
            # The owner left the organisation: the key may no longer charge it.
            raise RevokedApiKey("API key's organisation no longer includes its owner")
        return ValidatedKey(key, user, org_ids)

    async def principal_from_api_key(self, raw_key: str) -> Principal:
        found = await self.validate_api_key(raw_key)
        return Principal(
            user_id=found.user.id,
            roles=frozenset(found.user.roles),
            org_ids=frozenset(found.org_ids),
            method="api_key",
            api_key_id=found.key.id,
            username=found.user.username,
            key_org_id=found.key.org_id,
            session_id=found.key.session_id,
        )

    # organisations
    async def create_org(self, principal: Principal, name: str) -> Organization:
        now = self.clock.now()
        org = Organization(id=uuid.uuid4(), name=name, owner_id=principal.user_id, created_at=now)
        owner = OrgMember(org_id=org.id, user_id=principal.user_id, role=OWNER, created_at=now)
        async with self.db.transaction() as session:
            repo = AuthRepository(session)
            if await repo.user_by_id(principal.user_id) is None:
                raise UserNotFound("your account no longer exists")
            await repo.add_org(org, owner)
        return org

    async def list_orgs(
        self, principal: Principal, page: PageRequest
    ) -> tuple[list[tuple[Organization, str]], int]:
        async with self.db.read() as session:
            rows, total = await AuthRepository(session).orgs_page(
                principal.user_id, page.offset, page.page_size
            )
        return list(rows), total

    async def _org_for_change(
        self, repo: AuthRepository, principal: Principal, org_id: uuid.UUID
    ) -> Organization:
        org = await repo.org_by_id(org_id)
        if org is None:
            raise OrgNotFound()
        if principal.is_admin or org.owner_id == principal.user_id:
            return org
        if await repo.membership(org_id, principal.user_id) is None:
            raise OrgNotFound()  # outsiders learn nothing about the org
        raise NotOrgOwner()

    async def add_member(
        self, principal: Principal, org_id: uuid.UUID, user_id: uuid.UUID
    ) -> OrgMember:
        async with self.db.transaction() as session:
            repo = AuthRepository(session)
            await self._org_for_change(repo, principal, org_id)
            if await repo.user_by_id(user_id) is None:
                raise UserNotFound()
            member = OrgMember(
                org_id=org_id, user_id=user_id, role=MEMBER, created_at=self.clock.now()
            )
            if not await repo.add_member(member):
                raise AlreadyMember()
        return member

    async def remove_member(
        self, principal: Principal, org_id: uuid.UUID, user_id: uuid.UUID
    ) -> None:
        async with self.db.transaction() as session:
            repo = AuthRepository(session)
            org = await self._org_for_change(repo, principal, org_id)
            if org.owner_id == user_id:
                raise CannotRemoveOwner()
            if not await repo.remove_member(org_id, user_id):
                raise UserNotFound("user is not a member of the organisation")
