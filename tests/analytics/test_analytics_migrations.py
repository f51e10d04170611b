"""Analytics migrations on SQLite and PostgreSQL: analytics_0003 copies the model that events
stored before it kept in `details` into the new `model` column."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

from sqlalchemy import text

from leaky_tokens.shared.database import Database
from leaky_tokens.shared.migrations import upgrade_database

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


async def _insert_event(db: Database, details: dict[str, object]) -> uuid.UUID:
    event_id = uuid.uuid4()
    sqlite = db.is_sqlite
    at: object = NOW.replace(tzinfo=None).isoformat(sep=" ") if sqlite else NOW
    async with db.transaction() as session:
        await session.execute(
            text(
                "INSERT INTO usage_event (event_id, event_type, decision, allowed, user_id, "
                "provider, tokens, occurred_at, details, received_at) VALUES (:id, "
                "'TokensConsumed', 'ALLOWED', true, :user, 'openai', 5, :at, :details, :at)"
            ),
            {
                "id": event_id.hex if sqlite else event_id,
                "user": uuid.uuid4().hex if sqlite else uuid.uuid4(),
                "at": at,
                "details": json.dumps(details),
            },
        )
    return event_id


async def test_0003_copies_a_model_kept_in_details_into_the_column(database_url: str) -> None:
    await upgrade_database(database_url, "analytics", "analytics_0001")
    db = Database(database_url)
    try:
        named = await _insert_event(db, {"model": "gpt-4o-mini", "stream": True})
        unnamed = await _insert_event(db, {})
        odd = await _insert_event(db, {"model": 42})
        await upgrade_database(database_url, "analytics", "analytics_0003")
        async with db.read() as session:
            rows = (await session.execute(text("SELECT event_id, model FROM usage_event"))).all()
        found = {
            uuid.UUID(str(r[0])) if not isinstance(r[0], uuid.UUID) else r[0]: r[1] for r in rows
        }
        assert found == {named: "gpt-4o-mini", unnamed: None, odd: None}
    finally:
        await db.dispose()
