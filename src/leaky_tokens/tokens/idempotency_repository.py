"""Every SQL statement of idempotent inference (issue 12): claim, take over, complete, release,
sweep. Each change is one conditional statement on the row's primary key and its `owner`, so
two attempts can never both hold a key, and only the holder can complete or release it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, literal, select, update

from leaky_tokens.shared.database import Executes, UtcDateTime
from leaky_tokens.tokens.models import IdempotencyRecord
from leaky_tokens.tokens.repository import _insert_for

IN_PROGRESS = "in_progress"
COMPLETED = "completed"


@dataclass(frozen=True, slots=True)
class StoredKey:
    fingerprint: str
    state: str
    owner: uuid.UUID
    lease_until: datetime
    expires_at: datetime
    status_code: int | None
    content_type: str | None
    body: bytes | None


def _at(value: datetime) -> object:
    return literal(value, UtcDateTime())


class IdempotencyRepository:
    def __init__(self, executor: Executes) -> None:
        self.executor = executor

    async def insert(
        self,
        scope: str,
        key_hash: str,
        fingerprint: str,
        owner: uuid.UUID,
        *,
        now: datetime,
        lease_until: datetime,
        expires_at: datetime,
    ) -> bool:
        """The claim: True if this call wrote the row (nobody held the key)."""
        statement = (
            _insert_for(self.executor)(IdempotencyRecord)
            .values(
                scope=scope,
                key_hash=key_hash,
                fingerprint=fingerprint,
                state=IN_PROGRESS,
                owner=owner,
                lease_until=lease_until,
                created_at=now,
                expires_at=expires_at,
            )
            .on_conflict_do_nothing(index_elements=["scope", "key_hash"])
            .returning(IdempotencyRecord.scope)
        )
        result = await self.executor.execute(statement)
        return result.first() is not None

    async def get(self, scope: str, key_hash: str) -> StoredKey | None:
        r = IdempotencyRecord
        row = (
            await self.executor.execute(
                select(
                    r.fingerprint,
                    r.state,
                    r.owner,
                    r.lease_until,
                    r.expires_at,
                    r.status_code,
                    r.content_type,
                    r.body,
                ).where(r.scope == scope, r.key_hash == key_hash)
            )
        ).one_or_none()
        if row is None:
            return None
        return StoredKey(
            row[0], row[1], uuid.UUID(str(row[2])), row[3], row[4], row[5], row[6], row[7]
        )

    async def take_over(
        self,
        scope: str,
        key_hash: str,
        *,
        previous_owner: uuid.UUID,
        owner: uuid.UUID,
        fingerprint: str,
        now: datetime,
        lease_until: datetime,
        expires_at: datetime,
    ) -> bool:
        """Hold a key whose holder's lease ran out (or whose record expired), if nobody else
        took it first: a fresh in-progress claim for `owner`."""
        r = IdempotencyRecord
        result = await self.executor.execute(
            update(r)
            .where(r.scope == scope, r.key_hash == key_hash, r.owner == previous_owner)
            .values(
                owner=owner,
                fingerprint=fingerprint,
                state=IN_PROGRESS,
                lease_until=lease_until,
                status_code=None,
                content_type=None,
                body=None,
                created_at=now,
                expires_at=expires_at,
            )
        )
        return bool(result.rowcount == 1)

    async def complete(
        self,
        scope: str,
        key_hash: str,
        owner: uuid.UUID,
        *,
        status_code: int,
        content_type: str,
        body: bytes,
        expires_at: datetime,
    ) -> bool:
        r = IdempotencyRecord
        result = await self.executor.execute(
            update(r)
            .where(
                r.scope == scope,
                r.key_hash == key_hash,
                r.owner == owner,
                r.state == IN_PROGRESS,
            )
            .values(
                state=COMPLETED,
                status_code=status_code,
                content_type=content_type,
                body=body,
                expires_at=expires_at,
            )
        )
        return bool(result.rowcount == 1)

    async def release(self, scope: str, key_hash: str, owner: uuid.UUID) -> bool:
        r = IdempotencyRecord
        result = await self.executor.execute(
            delete(r).where(
                r.scope == scope,
                r.key_hash == key_hash,
                r.owner == owner,
                r.state == IN_PROGRESS,
            )
        )
        return bool(result.rowcount == 1)

    async def delete_expired(self, now: datetime, limit: int) -> int:
        r = IdempotencyRecord
        due = (
            select(r.scope, r.key_hash)
            .where(r.expires_at <= _at(now))
            .order_by(r.expires_at)
            .limit(limit)
        )
        rows = (await self.executor.execute(due)).all()
        deleted = 0
        for scope, key_hash in rows:
            result = await self.executor.execute(
                delete(r).where(r.scope == scope, r.key_hash == key_hash, r.expires_at <= _at(now))
            )
            deleted += int(result.rowcount or 0)
        return deleted
