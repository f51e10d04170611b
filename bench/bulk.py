"""Bulk rows for retention benchmarks and tests: outbox rows and analytics usage events made by
one INSERT … SELECT in the database itself (a recursive CTE on SQLite, generate_series on
PostgreSQL), a million in seconds, never through HTTP.

Rows are a pure function of their number `n` (and a salt that keeps event ids unique across
fills): users `n % users`, providers and models by turns, one event in ten RATE_LIMITED and one
in ten QUOTA_INSUFFICIENT, one in five charged to an org, times spread evenly over [start, end).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text

from leaky_tokens.shared.database import Database

CHUNK = 200_000  # rows per statement (SQLite's recursive CTE and a transaction stay modest)

_SQLITE_USAGE = """
WITH RECURSIVE seq(n) AS (SELECT :first UNION ALL SELECT n + 1 FROM seq WHERE n + 1 < :last),
t(n, us) AS (SELECT n, :start_us + (n * :span_us) / :count FROM seq)
INSERT INTO usage_event (event_id, event_type, decision, allowed, user_id, org_id, provider,
  tokens, occurred_at, request_id, model, prompt_tokens, completion_tokens, latency_ms, details,
  received_at)
SELECT printf('%08x%024x', :salt, n),
  CASE WHEN n % 10 = 9 THEN 'ConsumptionRateLimited'
       WHEN n % 10 = 8 THEN 'ConsumptionQuotaInsufficient' ELSE 'TokensConsumed' END,
  CASE WHEN n % 10 = 9 THEN 'RATE_LIMITED' WHEN n % 10 = 8 THEN 'QUOTA_INSUFFICIENT'
       ELSE 'ALLOWED' END,
  n % 10 < 8,
  printf('%032x', 4096 + n % :users),
  CASE WHEN n % 5 = 0 THEN printf('%032x', 65536 + n % 7) END,
  CASE n % 3 WHEN 0 THEN 'openai' WHEN 1 THEN 'qwen' ELSE 'gemini' END,
  1 + (n * 7919) % 500,
  strftime('%Y-%m-%d %H:%M:%S', us / 1000000, 'unixepoch') || '.' || printf('%06d', us % 1000000),
  'req_' || n,
  CASE WHEN (n / 3) % 2 = 1 THEN (CASE n % 3 WHEN 0 THEN 'gpt-4o-mini' WHEN 1 THEN 'qwen-plus'
       ELSE 'gemini-2.0-flash' END) END,
  CASE WHEN (n / 3) % 2 = 1 THEN (1 + (n * 7919) % 500) / 3 END,
  CASE WHEN (n / 3) % 2 = 1 THEN (1 + (n * 7919) % 500) - (1 + (n * 7919) % 500) / 3 END,
  CASE WHEN (n / 3) % 2 = 1 THEN 50 + (n * 31) % 950 END,
  '{}',
  strftime('%Y-%m-%d %H:%M:%S', us / 1000000, 'unixepoch') || '.' || printf('%06d', us % 1000000)
FROM t
"""

_PG_USAGE = """
WITH t AS (
  SELECT n, timestamptz 'epoch' + ((CAST(:start_us AS bigint)
         + (n * CAST(:span_us AS bigint)) / CAST(:count AS bigint))::float8
         * interval '1 microsecond') AS at
  FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint) - 1) AS n
)
INSERT INTO usage_event (event_id, event_type, decision, allowed, user_id, org_id, provider,
  tokens, occurred_at, request_id, model, prompt_tokens, completion_tokens, latency_ms, details,
  received_at)
SELECT (lpad(to_hex(CAST(:salt AS bigint)), 8, '0') || lpad(to_hex(n), 24, '0'))::uuid,
  CASE WHEN n % 10 = 9 THEN 'ConsumptionRateLimited'
       WHEN n % 10 = 8 THEN 'ConsumptionQuotaInsufficient' ELSE 'TokensConsumed' END,
  CASE WHEN n % 10 = 9 THEN 'RATE_LIMITED' WHEN n % 10 = 8 THEN 'QUOTA_INSUFFICIENT'
       ELSE 'ALLOWED' END,
  n % 10 < 8,
  lpad(to_hex(4096 + n % CAST(:users AS bigint)), 32, '0')::uuid,
  CASE WHEN n % 5 = 0 THEN lpad(to_hex(65536 + n % 7), 32, '0')::uuid END,
  CASE n % 3 WHEN 0 THEN 'openai' WHEN 1 THEN 'qwen' ELSE 'gemini' END,
  1 + (n * 7919) % 500,
  at,
  'req_' || n,
  CASE WHEN (n / 3) % 2 = 1 THEN (CASE n % 3 WHEN 0 THEN 'gpt-4o-mini' WHEN 1 THEN 'qwen-plus'
       ELSE 'gemini-2.0-flash' END) END,
  CASE WHEN (n / 3) % 2 = 1 THEN (1 + (n * 7919) % 500) / 3 END,
  CASE WHEN (n / 3) % 2 = 1 THEN (1 + (n * 7919) % 500) - (1 + (n * 7919) % 500) / 3 END,
  CASE WHEN (n / 3) % 2 = 1 THEN 50 + (n * 31) % 950 END,
  '{}',
  at
FROM t
"""

_SQLITE_OUTBOX = """
WITH RECURSIVE seq(n) AS (SELECT :first UNION ALL SELECT n + 1 FROM seq WHERE n + 1 < :last),
t(n, us) AS (SELECT n, :start_us + (n * :span_us) / :count FROM seq)
INSERT INTO token_outbox (event_id, stream, event_type, aggregate_id, payload, created_at,
  published_at)
SELECT printf('%08x%024x', :salt, n), 'usage', 'TokensConsumed', printf('%032x', n % 1000),
  '{"tokens": ' || (1 + n % 500) || '}',
  strftime('%Y-%m-%d %H:%M:%S', us / 1000000, 'unixepoch') || '.' || printf('%06d', us % 1000000),
  CASE WHEN :published THEN strftime('%Y-%m-%d %H:%M:%S', us / 1000000 + 1, 'unixepoch')
       || '.' || printf('%06d', us % 1000000) END
FROM t
"""

_PG_OUTBOX = """
WITH t AS (
  SELECT n, timestamptz 'epoch' + ((CAST(:start_us AS bigint)
         + (n * CAST(:span_us AS bigint)) / CAST(:count AS bigint))::float8
         * interval '1 microsecond') AS at
  FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint) - 1) AS n
)
INSERT INTO token_outbox (event_id, stream, event_type, aggregate_id, payload, created_at,
  published_at)
SELECT (lpad(to_hex(CAST(:salt AS bigint)), 8, '0') || lpad(to_hex(n), 24, '0'))::uuid, 'usage',
  'TokensConsumed', lpad(to_hex(n % 1000), 32, '0'), ('{"tokens": ' || (1 + n % 500) || '}')::json,
  at, CASE WHEN CAST(:published AS boolean) THEN at + interval '1 second' END
FROM t
"""


def _us(moment: datetime) -> int:
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


async def _fill(
    db: Database,
    sqlite_sql: str,
    pg_sql: str,
    count: int,
    start: datetime,
    end: datetime,
    **params: object,
) -> None:
    sql = text(sqlite_sql if db.is_sqlite else pg_sql)
    base = {
        "start_us": _us(start),
        "span_us": _us(end) - _us(start),
        "count": count,
        **params,
    }
    for first in range(0, count, CHUNK):
        async with db.transaction() as session:
            await session.execute(sql, {**base, "first": first, "last": min(count, first + CHUNK)})


async def fill_usage_events(
    db: Database,
    count: int,
    start: datetime,
    end: datetime,
    *,
    users: int = 1000,
    salt: int = 1,
) -> None:
    """`count` usage events (raw, in usage_event) spread evenly over [start, end)."""
    await _fill(db, _SQLITE_USAGE, _PG_USAGE, count, start, end, users=users, salt=salt)


async def fill_outbox(
    db: Database,
    count: int,
    start: datetime,
    end: datetime,
    *,
    published: bool = True,
    salt: int = 1,
) -> None:
    """`count` token_outbox rows created over [start, end), published a second after creation
    (or not at all)."""
    await _fill(db, _SQLITE_OUTBOX, _PG_OUTBOX, count, start, end, published=published, salt=salt)
