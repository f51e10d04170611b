"""Every SQL statement of the auth service."""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from leaky_tokens.auth.jwt_tokens import KeyMaterial
from leaky_tokens.auth.models import (
    ApiKey,
    ApiKeyRevocation,
    LoginAddress,
    Organization,
    OrgMember,
    SigningKey,
    User,
)
from leaky_tokens.shared.principal_feed import PrincipalChange

_CHANGE_COLUMNS = (
    ApiKeyRevocation.seq,
    ApiKeyRevocation.kind,
    ApiKeyRevocation.user_id,
    ApiKeyRevocation.org_id,
    ApiKeyRevocation.api_key_id,
)


def _insert_for(session: AsyncSession) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


class DuplicateUser(Exception):
    def __init__(self, field: str) -> None:
        self.field = field


class AuthRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # users
    async def add_user(self, user: User) -> None:
        self.session.add(user)
        try:
            await self.session.flush()
        except IntegrityError as exc:
            message = str(exc.orig).lower()
            raise DuplicateUser("email" if "email" in message else "username") from exc

    async def user_by_id(self, user_id: uuid.UUID) -> User | None:
        return await self.session.get(User, user_id)

    async def user_by_username(self, username: str) -> User | None:
        result = await self.session.execute(
            select(User).where(User.username_lower == username.lower())
        )
        return result.scalar_one_or_none()

    async def taken_field(self, username: str, email: str) -> str | None:
        """Which of username/email is already registered (case-insensitive), if any."""
        rows = await self.session.execute(
            select(User.username_lower).where(
                (User.username_lower == username.lower()) | (User.email_lower == email.lower())
            )
        )
        found = list(rows.scalars())
        if username.lower() in found:
            return "username"
        return "email" if found else None

    # API keys
    async def add_api_key(self, key: ApiKey) -> None:
        self.session.add(key)
        await self.session.flush()

    async def api_key_by_hash(self, key_hash: str) -> ApiKey | None:
        result = await self.session.execute(select(ApiKey).where(ApiKey.key_hash == key_hash))
        return result.scalar_one_or_none()

    async def api_key_of_user(self, user_id: uuid.UUID, key_id: uuid.UUID) -> ApiKey | None:
        result = await self.session.execute(
            select(ApiKey).where(ApiKey.id == key_id, ApiKey.user_id == user_id)
        )
        return result.scalar_one_or_none()

    async def lock_user(self, user_id: uuid.UUID) -> User | None:
        """The user, row-locked until the transaction ends on PostgreSQL (SQLite write
        transactions hold the database's one write lock already)."""
        statement = select(User).where(User.id == user_id)
        if self.session.get_bind().dialect.name == "postgresql":
            statement = statement.with_for_update()
        result = await self.session.execute(statement)
        return result.scalar_one_or_none()

    async def count_active_api_keys(self, user_id: uuid.UUID, now: datetime) -> int:
        """The user's own live keys. Agent sessions' credentials are not counted: each is
        bounded by its session (budget, lifetime) and dies with it (issue 13)."""
        count = await self.session.scalar(
            select(func.count())
            .select_from(ApiKey)
            .where(
                ApiKey.user_id == user_id,
                ApiKey.session_id.is_(None),
                ApiKey.revoked_at.is_(None),
                (ApiKey.expires_at.is_(None)) | (ApiKey.expires_at > now),
            )
        )
        return int(count or 0)

    async def api_keys_page(
        self, user_id: uuid.UUID, offset: int, limit: int
    ) -> tuple[Sequence[ApiKey], int]:
        total = await self.session.scalar(
            select(func.count()).select_from(ApiKey).where(ApiKey.user_id == user_id)
        )
        rows = await self.session.execute(
            select(ApiKey)
            .where(ApiKey.user_id == user_id)
            .order_by(ApiKey.created_at.desc(), ApiKey.id)
            .offset(offset)
            .limit(limit)
        )
        return rows.scalars().all(), int(total or 0)

    # the revocation feed (API keys and principal changes)
    async def add_change(
        self,
        kind: str,
        at: datetime,
        *,
        api_key_id: uuid.UUID | None = None,
        user_id: uuid.UUID | None = None,
        org_id: uuid.UUID | None = None,
    ) -> int:
        """Append to the feed; returns the row's `seq`. On PostgreSQL a transaction-scoped lock
        makes `seq` order commit order, so a reader past `seq` N never sees a smaller one later
        (SQLite has one writer at a time already)."""
        if self.session.get_bind().dialect.name == "postgresql":
            await self.session.execute(
                text("SELECT pg_advisory_xact_lock(:id)"),
                {"id": zlib.crc32(b"leaky-tokens:api-key-revocations")},
            )
        row = ApiKeyRevocation(
            kind=kind, api_key_id=api_key_id, user_id=user_id, org_id=org_id, revoked_at=at
        )
        self.session.add(row)
        await self.session.flush()
        return row.seq

    async def changes_after(self, seq: int, limit: int) -> list[PrincipalChange]:
        rows = await self.session.execute(
            select(*_CHANGE_COLUMNS)
            .where(ApiKeyRevocation.seq > seq)
            .order_by(ApiKeyRevocation.seq)
            .limit(limit)
        )
        return [PrincipalChange(int(r[0]), r[1], r[2], r[3], r[4]) for r in rows.all()]

    async def principal_changes_since(self, since: datetime, limit: int) -> list[PrincipalChange]:
        """Changes of principals (not of API keys) made since `since`, oldest first."""
        rows = await self.session.execute(
            select(*_CHANGE_COLUMNS)
            .where(ApiKeyRevocation.kind != "api_key", ApiKeyRevocation.revoked_at >= since)
            .order_by(ApiKeyRevocation.seq)
            .limit(limit)
        )
        return [PrincipalChange(int(r[0]), r[1], r[2], r[3], r[4]) for r in rows.all()]

    async def last_revocation_seq(self) -> int:
        return int(await self.session.scalar(select(func.max(ApiKeyRevocation.seq))) or 0)

    # addresses that logged in
    async def is_known_address(self, user_id: uuid.UUID, address: str) -> bool:
        found = await self.session.get(LoginAddress, (user_id, address))
        return found is not None

    async def remember_address(self, user_id: uuid.UUID, address: str, at: datetime) -> None:
        insert = _insert_for(self.session)
        statement = insert(LoginAddress).values(
            user_id=user_id, address=address, last_success_at=at
        )
        await self.session.execute(
            statement.on_conflict_do_update(
                index_elements=["user_id", "address"], set_={"last_success_at": at}
            )
        )

    # signing keys
    async def lock_signing_keys(self) -> None:
        """Serialise key rotation across replicas (SQLite write transactions already are)."""
        if self.session.get_bind().dialect.name == "postgresql":
            await self.session.execute(
                text("SELECT pg_advisory_xact_lock(:id)"),
                {"id": zlib.crc32(b"leaky-tokens:signing-keys")},
            )

    async def newest_signing_keys(self, limit: int = 2) -> list[KeyMaterial]:
        rows = await self.session.execute(
            select(SigningKey).order_by(SigningKey.created_at.desc()).limit(limit)
        )
        return [
            KeyMaterial(
                kid=r.kid,
                private_pem=r.private_pem,
                public_jwk=r.public_jwk,
                created_at=r.created_at,
            )
            for r in rows.scalars()
        ]

    async def plain_signing_keys(self) -> list[SigningKey]:
        """Stored keys not yet encrypted at rest."""
        rows = await self.session.execute(
            select(SigningKey).where(SigningKey.private_pem.not_like("%ENCRYPTED PRIVATE KEY%"))
        )
        return list(rows.scalars())

    async def add_signing_key(self, material: KeyMaterial) -> None:
        self.session.add(
            SigningKey(
                kid=material.kid,
                private_pem=material.private_pem,
                public_jwk=material.public_jwk,
                created_at=material.created_at,
            )
        )
        await self.session.flush()

    # organisations
    async def add_org(self, org: Organization, owner: OrgMember) -> None:
        self.session.add(org)
        await self.session.flush()
        self.session.add(owner)
        await self.session.flush()

    async def org_by_id(self, org_id: uuid.UUID) -> Organization | None:
        return await self.session.get(Organization, org_id)

    async def membership(self, org_id: uuid.UUID, user_id: uuid.UUID) -> OrgMember | None:
        return await self.session.get(OrgMember, (org_id, user_id))

    async def add_member(self, member: OrgMember) -> bool:
        """False when the user is already a member (the primary key says so)."""
        try:
            async with self.session.begin_nested():
                self.session.add(member)
                await self.session.flush()
        except IntegrityError:
            return False
        return True

    async def remove_member(self, org_id: uuid.UUID, user_id: uuid.UUID) -> bool:
        result = await self.session.execute(
            delete(OrgMember).where(OrgMember.org_id == org_id, OrgMember.user_id == user_id)
        )
        return bool(getattr(result, "rowcount", 0))

    async def org_ids_of(self, user_id: uuid.UUID) -> list[uuid.UUID]:
        rows = await self.session.execute(
            select(OrgMember.org_id).where(OrgMember.user_id == user_id).order_by(OrgMember.org_id)
        )
        return list(rows.scalars())

    async def orgs_page(
        self, user_id: uuid.UUID, offset: int, limit: int
    ) -> tuple[Sequence[tuple[Organization, str]], int]:
        total = await self.session.scalar(
            select(func.count()).select_from(OrgMember).where(OrgMember.user_id == user_id)
        )
        rows = await self.session.execute(
            select(Organization, OrgMember.role)
            .join(OrgMember, OrgMember.org_id == Organization.id)
            .where(OrgMember.user_id == user_id)
            .order_by(Organization.created_at, Organization.id)
            .offset(offset)
            .limit(limit)
        )
        return [(org, role) for org, role in rows.all()], int(total or 0)

    async def set_roles(self, user: User, roles: list[str], now: datetime) -> None:
        user.roles = roles
        user.updated_at = now
        await self.session.flush()
