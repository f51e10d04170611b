"""ORM tables owned by the auth service."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String, Text, Uuid
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from leaky_tokens.shared.database import UtcDateTime


class AuthBase(DeclarativeBase):
    pass


class User(AuthBase):
    __tablename__ = "user_account"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    username: Mapped[str] = mapped_column(String(64))
    # Uniqueness is case-insensitive: the lower-cased copies carry the unique constraints.
    username_lower: Mapped[str] = mapped_column(String(64), unique=True)
    email: Mapped[str] = mapped_column(String(254))
    email_lower: Mapped[str] = mapped_column(String(254), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    roles: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class ApiKey(AuthBase):
    __tablename__ = "api_key"
    __table_args__ = (Index("ix_api_key_user_created", "user_id", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("user_account.id", ondelete="CASCADE")
    )
    name: Mapped[str] = mapped_column(String(100))
    # SHA-256 of the raw key: the raw key has 192 random bits, so a fast hash is enough.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    key_prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # A key made for an organisation (its owner a member): its /v1 calls charge the org's pool.
    org_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    # Set for an agent session's credential (issue 13): what it spends is charged to that
    # session's budget, and it expires and is revoked with the session.
    session_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True, index=True)


AutoId = BigInteger().with_variant(Integer(), "sqlite")


class ApiKeyRevocation(AuthBase):
    """The revocation feed: one row per revoked key or changed principal (`kind`: api_key,
    user, membership, role, org), `seq` in commit order (changes take a lock), so a reader that
    remembers the last `seq` it saw misses none. (The table kept its first name.)"""

    __tablename__ = "api_key_revocation"
    __table_args__ = (Index("ix_api_key_revocation_kind_at", "kind", "revoked_at"),)

    seq: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16), default="api_key", server_default="api_key")
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    org_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    revoked_at: Mapped[datetime] = mapped_column(UtcDateTime)


class LoginAddress(AuthBase):
    """An address an account logged in from successfully: its owner there escapes the back-off
    that failures from elsewhere put on the account."""

    __tablename__ = "login_address"

    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("user_account.id", ondelete="CASCADE"), primary_key=True
    )
    address: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_success_at: Mapped[datetime] = mapped_column(UtcDateTime)


class SigningKey(AuthBase):
    __tablename__ = "signing_key"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    private_pem: Mapped[str] = mapped_column(Text)
    public_jwk: Mapped[dict[str, str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class Organization(AuthBase):
    __tablename__ = "organization"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    owner_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("user_account.id"))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class OrgMember(AuthBase):
    __tablename__ = "org_member"
    __table_args__ = (Index("ix_org_member_user", "user_id"),)

    org_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("organization.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("user_account.id", ondelete="CASCADE"), primary_key=True
    )
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
