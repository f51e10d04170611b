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
    AccountExists,
    AlreadyMember,
    ApiKeyNotFound,
    CannotRemoveOwner,
    EmailTaken,
    InvalidCredentials,
    LoginThrottled,
    NotOrgOwner,
    OrgNotFound,
    RegistrationThrottled,
    TooManyApiKeys,
    UsernameTaken,
    UserNotFound,
    WeakPassword,
)
from leaky_tokens.auth.jwt_tokens import KeyRing, generate_key_material, reencrypted_pem
from leaky_tokens.auth.models import ApiKey, Organization, OrgMember, User
from leaky_tokens.auth.passwords import PasswordPolicy, Passwords
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
    RevokedToken,
)
from leaky_tokens.shared.jwt_verify import principal_from_claims
from leaky_tokens.shared.pagination import PageRequest
from leaky_tokens.shared.principal import ADMIN, USER, Principal
from leaky_tokens.shared.principal_feed import PrincipalChange, PrincipalChanges
from leaky_tokens.shared.rate_limit import FixedWindowLimiter, Policy

OWNER = "OWNER"
MEMBER = "MEMBER"

log = logging.getLogger("leaky_tokens.auth")

_FEED_RECHECK_SECONDS = 0.25  # a long poll re-reads the feed this often (other replicas' news)
# Principal changes older than the longest token life allowed (jwt_ttl_seconds <= 7 days) can
# concern no live token: a follower starting now is given the ones within it.
PRINCIPAL_CHANGE_HORIZON = timedelta(days=7, minutes=5)


@dataclass(frozen=True)
class IssuedSession:
    user: User
    token: str


@dataclass(frozen=True)
class ValidatedKey:
    key: ApiKey
    user: User
    org_ids: list[uuid.UUID]
    feed_seq: int  # the feed's cursor before the answer was read


@dataclass(frozen=True)
class FeedPage:
    cursor: int
    changes: list[PrincipalChange]
    more: bool


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
        # Told (seq, key id) after a key revocation commits, and (seq, kind) after a principal
        # change commits, e.g. to publish it on Redis; the feed (`feed_after`) has both anyway.
        self.announce_revocation: Callable[[int, uuid.UUID], Awaitable[None]] | None = None
        self.announce_change: Callable[[int, str], Awaitable[None]] | None = None
        # Set (and replaced) on each change made here, waking followers waiting on the feed.
        self._revoked_here = asyncio.Event()
        # This replica's view of principal changes (its own at once, others' within a refresh),
        # against which the bearer tokens it verifies itself are checked.
        self.changes = PrincipalChanges()
        self._changes_cursor: int | None = None
        self.policy = PasswordPolicy(
            settings.password_min_length, settings.password_refuse_commonest
        )
        self._client_policy = Policy(
            "login:client",
            settings.login_max_attempts_per_client,
            settings.login_client_window_seconds,
        )
        self._account_policies = [
            Policy(f"login:acct:{limit.window_seconds}", limit.attempts, limit.window_seconds)
            for limit in settings.login_account_limits
        ]
        known = settings.login_known_address_limit
        self._known_policy = Policy("login:known", known.attempts, known.window_seconds)
        self._conflict_policy = Policy(
            "register:conflicts",
            settings.registration_conflicts_per_client,
            settings.registration_conflict_window_seconds,
        )
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
    def _check_password_policy(self, password: str, username: str, email: str) -> None:
        message = self.policy.problem(password, username=username, email=email)
        if message is not None:
            raise WeakPassword(message, details=[{"field": "password", "message": message}])

    async def create_user(
        self, username: str, email: str, password: str, *, admin: bool = False
    ) -> User:
        """A new account (the CLI and the admin bootstrap say which field is taken; public
        registration does not, see `register`)."""
        self._check_password_policy(password, username, email)
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

    async def register(
        self, username: str, email: str, password: str, client: str = "unknown"
    ) -> IssuedSession:
        """Public registration. A username or email that exists gets one answer whichever it
        was (the password was hashed first, so it takes as long as a success), and such
        conflicts are counted per client address: past the limit, 429 until the window ends."""
        conflicts = await self.throttle.peek(client, self._conflict_policy)
        if not conflicts.allowed:
            raise RegistrationThrottled(
                headers={"Retry-After": str(conflicts.retry_after)},
                extra={"retryAfterSeconds": conflicts.retry_after},
            )
        try:
            user = await self.create_user(username, email, password)
        except (UsernameTaken, EmailTaken) as exc:
            await self.throttle.hit([(client, self._conflict_policy)])
            raise AccountExists() from exc
        async with self.db.transaction() as session:
            repo = AuthRepository(session)
            # Where the account was made is where its owner is: a known address (login).
            await repo.remember_address(user.id, client, self.clock.now())
            seq = await repo.last_revocation_seq()
        return IssuedSession(user, self._issue(user, [], seq))

    async def ensure_admin(self, username: str, email: str, password: str) -> User:
        """Bootstrap an ADMIN from settings: create it, or grant ADMIN to the existing account
        when the configured password is that account's own."""
        async with self.db.transaction() as session:
            repo = AuthRepository(session)
            existing = await repo.user_by_username(username)
            if existing is not None and ADMIN in existing.roles:
                return existing
            if existing is not None:
                # Anyone may have registered the name before it was configured: only the
                # holder of the configured password proves the account is the operator's.
                if not await self.passwords.verify(existing.password_hash, password):
                    log.error(
                        "not granting ADMIN to existing account %r: its password is not the "
                        "configured admin password",
                        username,
                    )
                    return existing
                now = self.clock.now()
                await repo.set_roles(existing, [*existing.roles, ADMIN], now)
                seq = await repo.add_change("role", now, user_id=existing.id)
        if existing is not None:
            await self._changed_here(seq, "role")
            return existing
        return await self.create_user(username, email, password, admin=True)

    async def login(self, username: str, password: str, client: str) -> IssuedSession:
        """Every attempt is counted before the password is checked, in one atomic step of the
        shared limiter. From an address the account never logged in from: per client address
        and in the account's widening back-off windows. From an address it logged in from
        before: in that (account, address)'s own window only, so guesses from elsewhere never
        lock the owner out."""
        async with self.db.read() as session:
            repo = AuthRepository(session)
            # The cursor first: a change committed after this read makes the token stale.
            seq = await repo.last_revocation_seq()
            user = await repo.user_by_username(username)
            known = user is not None and await repo.is_known_address(user.id, client)
            org_ids = await repo.org_ids_of(user.id) if user else []
        account = username.lower()
        if known:
            # The owner at home: only this account from this address is counted here (an
            # attacker there could try this one account only, at the known window's pace).
            limits = [(f"{account}|{client}", self._known_policy)]
        else:
            limits = [(client, self._client_policy)]
            limits += [(account, policy) for policy in self._account_policies]
        decision = await self.throttle.hit(limits)
        if not decision.allowed:
            retry = decision.retry_after
            raise LoginThrottled(
                headers={"Retry-After": str(retry)}, extra={"retryAfterSeconds": retry}
            )
        if not await self.passwords.verify(user.password_hash if user else None, password):
            raise InvalidCredentials()
        assert user is not None
        if known:
            # Only the password's holder can clear the window at home: the owner logging in
            # often is never throttled, a guesser there still gets only the window's tries.
            await self.throttle.clear(*limits[0])
        else:
            async with self.db.transaction() as session:
                await AuthRepository(session).remember_address(user.id, client, self.clock.now())
        return IssuedSession(user, self._issue(user, org_ids, seq))

    def _issue(self, user: User, org_ids: list[uuid.UUID], feed_seq: int) -> str:
        return self.keys.issue(
            user_id=user.id,
            username=user.username,
            roles=list(user.roles),
            org_ids=org_ids,
            now=self.clock.now(),
            feed_seq=feed_seq,
        )

    def principal_from_bearer(self, token: str) -> Principal:
        principal = principal_from_claims(self.keys.verify(token))
        if self.changes.is_stale(principal):
            raise RevokedToken()
        return principal

    # principal changes: the feed's other half
    async def _changed_here(self, seq: int, kind: str) -> None:
        """After a change committed here: apply it to this replica's view at once, wake the
        feed's long polls, and announce it (Redis); followers read the feed for the rest."""
        self._revoked_here.set()
        self._revoked_here = asyncio.Event()
        await self.refresh_principal_changes()
        if self.announce_change is not None:
            try:
                await self.announce_change(seq, kind)
            except Exception:
                log.exception("could not announce principal change %s", seq)

    async def refresh_principal_changes(self) -> None:
        """Bring this replica's view up to date with the feed (called every quarter second,
        and at once after a change made here)."""
        async with self.db.read() as session:
            repo = AuthRepository(session)
            if self._changes_cursor is None:
                cursor = await repo.last_revocation_seq()
                recent = await repo.principal_changes_since(
                    self.clock.now() - PRINCIPAL_CHANGE_HORIZON, 100_000
                )
                self.changes.apply(recent)
                self._changes_cursor = cursor
                return
            while True:
                found = await repo.changes_after(self._changes_cursor, 1000)
                if not found:
                    return
                self.changes.apply(found)
                self._changes_cursor = found[-1].seq

    async def revoke_user_sessions(self, principal: Principal, user_id: uuid.UUID) -> None:
        """Every token the user holds stops working (their API keys are untouched)."""
        if not principal.may_act_for_user(user_id):
            raise Forbidden("you may only revoke your own sessions")
        async with self.db.transaction() as session:
            repo = AuthRepository(session)
            if await repo.user_by_id(user_id) is None:
                raise UserNotFound()
            seq = await repo.add_change("user", self.clock.now(), user_id=user_id)
        await self._changed_here(seq, "user")

    async def set_roles(self, principal: Principal, user_id: uuid.UUID, roles: list[str]) -> User:
        """ADMIN only. The user's tokens issued before stop working (they carry the old roles)."""
        if not principal.is_admin:
            raise Forbidden("only an ADMIN may change roles")
        wanted = sorted(set(roles))
        if USER not in wanted or not set(wanted) <= {USER, ADMIN}:
            message = "roles must include USER and may add ADMIN"
            raise InvalidRequest(message, details=[{"field": "roles", "message": message}])
        async with self.db.transaction() as session:
            repo = AuthRepository(session)
            user = await repo.user_by_id(user_id)
            if user is None:
                raise UserNotFound()
            if sorted(user.roles) == wanted:
                return user
            now = self.clock.now()
            await repo.set_roles(user, wanted, now)
            seq = await repo.add_change("role", now, user_id=user_id)
        await self._changed_here(seq, "role")
        return user

    async def revoke_org_tokens(self, principal: Principal, org_id: uuid.UUID) -> None:
        """The tenant's tokens as a whole: every token naming the organisation, issued before
        now, stops working for every member (the owner or an ADMIN may)."""
        async with self.db.transaction() as session:
            repo = AuthRepository(session)
            await self._org_for_change(repo, principal, org_id)
            seq = await repo.add_change("org", self.clock.now(), org_id=org_id)
        await self._changed_here(seq, "org")

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
                seq = await repo.add_change(
                    "api_key", key.revoked_at, api_key_id=key.id, user_id=user_id
                )
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

    async def feed_after(
        self,
        seq: int | None,
        limit: int,
        *,
        wait_seconds: float = 0.0,
        gone: Callable[[], Awaitable[bool]] | None = None,
    ) -> FeedPage:
        """The feed after `seq`: (cursor, changes after it, more to come). Without `seq`: the
        current cursor and the principal changes recent enough to concern a token still alive
        (not key revocations: a follower that starts now has cached no key). A cursor below
        `seq` tells the follower the feed is not the one it was following (a fresh database).

        With `wait_seconds`, an empty answer is held back until a change comes (at once for one
        made on this replica; others are read from the database every quarter second), the time
        is up, or the follower is `gone`: a long poll, so followers learn of a change at once
        without asking many times a second."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        while True:
            signal = self._revoked_here
            found = await self._feed_after(seq, limit)
            left = deadline - loop.time()
            if found.changes or seq is None or left <= 0 or (gone is not None and await gone()):
                return found
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, _FEED_RECHECK_SECONDS)):
                    await signal.wait()

    async def _feed_after(self, seq: int | None, limit: int) -> FeedPage:
        async with self.db.read() as session:
            repo = AuthRepository(session)
            if seq is None:
                cursor = await repo.last_revocation_seq()
                since = self.clock.now() - PRINCIPAL_CHANGE_HORIZON
                recent = await repo.principal_changes_since(since, 100_000)
                return FeedPage(cursor, [c for c in recent if c.seq <= cursor], False)
            rows = await repo.changes_after(seq, limit + 1)
            if not rows:
                return FeedPage(min(seq, await repo.last_revocation_seq()), [], False)
        more = len(rows) > limit
        rows = rows[:limit]
        return FeedPage(rows[-1].seq, rows, more)

    async def validate_api_key(self, raw_key: str) -> ValidatedKey:
        if not api_keys.looks_like_key(raw_key):
            raise InvalidApiKey()
        async with self.db.read() as session:
            repo = AuthRepository(session)
            seq = await repo.last_revocation_seq()  # before the memberships (see login)
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
        return ValidatedKey(key, user, org_ids, seq)

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
            issued_seq=found.feed_seq,
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
            # Their tokens name the org: every one issued before now stops working.
            seq = await repo.add_change(
                "membership", self.clock.now(), user_id=user_id, org_id=org_id
            )
        await self._changed_here(seq, "membership")
