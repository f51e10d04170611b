"""Every SQL statement about stored Responses' owners (issue 12)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, literal, select

from leaky_tokens.shared.database import Executes, UtcDateTime
from leaky_tokens.tokens.models import StoredResponse
from leaky_tokens.tokens.repository import _insert_for


class StoredResponses:
    def __init__(self, executor: Executes) -> None:
        self.executor = executor

    async def remember(
        self, response_id: str, owner: str, model: str, now: datetime, expires_at: datetime
    ) -> None:
        await self.executor.execute(
            _insert_for(self.executor)(StoredResponse)
            .values(
                response_id=response_id,
                owner=owner,
                model=model,
                created_at=now,
                expires_at=expires_at,
            )
            .on_conflict_do_nothing(index_elements=["response_id"])
        )

    async def model_of(self, response_id: str, owner: str, now: datetime) -> str | None:
        """The catalogue model of `owner`'s stored response; None: not theirs, or expired."""
        row = (
            await self.executor.execute(
                select(StoredResponse.model).where(
                    StoredResponse.response_id == response_id,
                    StoredResponse.owner == owner,
                    StoredResponse.expires_at > literal(now, UtcDateTime()),
                )
            )
        ).one_or_none()
        return None if row is None else str(row[0])

    async def forget_expired(self, now: datetime) -> int:
        result = await self.executor.execute(
            delete(StoredResponse).where(StoredResponse.expires_at <= literal(now, UtcDateTime()))
        )
        return int(result.rowcount or 0)
