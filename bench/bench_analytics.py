"""Benchmark of the event pipeline (issue 5), loopback only, bounded:

1. Throughput, outbox -> stored row, per transport: N usage events are written to a fresh
   tokens outbox, then one relay (batches of 200) sends them to a real `leaky-tokens serve
   analytics` process; the figure is N / (time until analytics holds all N rows). Combinations:
   SQLite + HTTP push (embedded), PostgreSQL + Redis Streams (distributed), and the two cross
   combinations to tell the transport's share from the database's.
2. Delay, consume -> visible in /usage, under a steady open-loop consume load against
   `leaky-tokens up` (embedded and distributed): each consume carries its own X-Request-Id, a
   poller reads /usage every 25 ms, and the delay is first-seen minus the consume's answer
   (the event is committed before that answer; polling adds ~12 ms, and the poller's 40 GET/s
   are load on the same process). Beside it: the pipeline's own delay from the stored rows
   (received_at - occurred_at, one clock) in a separate phase with no poller.

    .venv/bin/python -m bench.bench_analytics [--runs 3] [--events 10000] [--rate 100]
                                              [--seconds 10]

Every figure is the median of --runs runs. PostgreSQL/Redis combinations are skipped with a
message when those servers do not answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import httpx

from bench.consume import PG_ADMIN, REDIS, _drop, _fresh_pg_databases, _prepare

TOKEN = "bench-internal-token"
STEP_TIMEOUT = 120.0
# The poller is load too (it shares the event loop with the services in `up`): 40 GET/s of
# the newest 50 items.
POLL_SECONDS = 0.025


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5):
            return True
    except OSError:
        return False


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _base_env(workdir: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAKY_") and k != "REDIS_URL"}
    env.update(
        {
            "LEAKY_DATA_DIR": str(workdir / "var"),
            "LEAKY_ACCESS_LOG": "false",
            "LEAKY_LOG_LEVEL": "warning",
            "LEAKY_INTERNAL_TOKEN": TOKEN,
        }
    )
    for service in ("gateway", "auth", "tokens", "analytics", "qwen", "gemini", "openai"):
        env[f"LEAKY_PORTS__{service.upper()}"] = "0"
    env.update(extra)
    return env


def _start(args: list[str], workdir: Path, env: dict[str, str]) -> tuple[Any, dict[str, int]]:
    ready = workdir / f"ready-{uuid.uuid4().hex[:6]}.json"
    log = (workdir / "log.txt").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "leaky_tokens.cli", *args, "--ready-file", str(ready)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    log.close()
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError((workdir / "log.txt").read_text()[-2000:])
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())["ports"]


def _stop(proc: Any) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


async def _count_rows(url: str, query: str) -> int:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1]
        with sqlite3.connect(path, timeout=5) as conn:
            return int(conn.execute(query).fetchone()[0])
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return int(await conn.fetchval(query))
    finally:
        await conn.close()


async def _fill_outbox(url: str, events: int) -> None:
    from sqlalchemy import Table, insert

    from leaky_tokens.shared.database import Database
    from leaky_tokens.shared.migrations import upgrade_database
    from leaky_tokens.tokens.models import OutboxEvent
    from leaky_tokens.tokens.outbox import usage_event

    await upgrade_database(url, "tokens")
    database = Database(url)
    table = cast(Table, OutboxEvent.__table__)
    try:
        for start in range(0, events, 1000):
            rows = []
            for _ in range(min(1000, events - start)):
                event = usage_event(
                    "ALLOWED",
                    user_id=uuid.uuid4(),
                    org_id=None,
                    provider="openai",
                    tokens=10,
                    now=datetime.now(UTC),
                    request_id=f"req_{uuid.uuid4().hex}",
                )
                row = {c.key: getattr(event, c.key) for c in table.columns}
                row.pop("id")
                rows.append(row)
            async with database.transaction() as session:
                await session.execute(insert(table), rows)
    finally:
        await database.dispose()


async def _relay_throughput(
    tokens_url: str, analytics_url: str, analytics_port: int, transport: str, prefix: str, n: int
) -> tuple[float, float]:
    """(events/s to stored rows, events/s sent by the relay)."""
    from redis.asyncio import Redis

    from leaky_tokens.shared.database import Database
    from leaky_tokens.shared.events import EventPublisher, HttpPushPublisher, RedisStreamPublisher
    from leaky_tokens.tokens.outbox_relay import OutboxRelay

    redis: Redis | None = None
    publisher: EventPublisher
    if transport == "redis":
        redis = Redis.from_url(REDIS)
        publisher = RedisStreamPublisher(redis, prefix=prefix)
    else:
        publisher = HttpPushPublisher.over_aiohttp(
            f"http://127.0.0.1:{analytics_port}/api/v1/analytics/events", TOKEN
        )
    database = Database(tokens_url)
    relay = OutboxRelay(database, publisher)
    started = time.perf_counter()
    task = asyncio.create_task(relay.run())
    sent_at: float | None = None
    try:
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            if sent_at is None and not await _count_rows(
                tokens_url, "SELECT count(*) FROM token_outbox WHERE published_at IS NULL"
            ):
                sent_at = time.perf_counter()
            if await _count_rows(analytics_url, "SELECT count(*) FROM usage_event") >= n:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("analytics did not catch up in time")
            await asyncio.sleep(0.01)
        stored = time.perf_counter() - started
    finally:
        relay.request_stop()
        await asyncio.wait({task}, timeout=15)
        await publisher.aclose()
        if redis is not None:
            await redis.aclose()
        await database.dispose()
    return n / stored, n / ((sent_at or time.perf_counter()) - started)


def throughput(database: str, transport: str, events: int) -> tuple[float, float]:
    databases: dict[str, str] = {}
    prefix = f"lt:bench:{uuid.uuid4().hex[:8]}:"
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if database == "postgresql":
            databases = asyncio.run(_fresh_pg_databases())
            tokens_url, analytics_url = databases["tokens"], databases["analytics"]
        else:
            tokens_url = f"sqlite+aiosqlite:///{workdir / 'tokens.db'}"
            analytics_url = f"sqlite+aiosqlite:///{workdir / 'analytics.db'}"
        extra = {
            "LEAKY_ANALYTICS__DATABASE_URL": analytics_url,
            "LEAKY_EVENTS__TRANSPORT": transport,
            "LEAKY_EVENTS__STREAM_PREFIX": prefix,
        }
        if transport == "redis":
            extra["REDIS_URL"] = REDIS
        proc = None
        try:
            asyncio.run(_fill_outbox(tokens_url, events))
            proc, ports = _start(["serve", "analytics"], workdir, _base_env(workdir, extra))
            return asyncio.run(
                _relay_throughput(
                    tokens_url, analytics_url, ports["analytics"], transport, prefix, events
                )
            )
        finally:
            if proc is not None:
                _stop(proc)
            if databases:
                asyncio.run(_drop(databases))
            if transport == "redis":
                asyncio.run(_delete_streams(prefix))


async def _delete_streams(prefix: str) -> None:
    from redis.asyncio import Redis

    redis = Redis.from_url(REDIS)
    try:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}*")]
        if keys:
            await redis.delete(*keys)
    finally:
        await redis.aclose()


async def _steady_load(
    ports: dict[str, int], rate: float, seconds: float, run_tag: str, *, poll_usage: bool
) -> tuple[str, list[float], int]:
    """Consumes at `rate`/s for `seconds` as a new user; with `poll_usage`, also returns the
    delays (s) until each consume shows in /usage. Returns (user id, delays, answered)."""
    user_id, token = await _prepare(ports)
    headers = {"Authorization": f"Bearer {token}"}
    tokens_url = f"http://127.0.0.1:{ports['tokens']}"
    analytics_url = f"http://127.0.0.1:{ports['analytics']}"
    answered: dict[str, float] = {}
    seen: dict[str, float] = {}
    total = int(rate * seconds)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with (
        httpx.AsyncClient(base_url=tokens_url, timeout=30, limits=limits) as tokens,
        httpx.AsyncClient(base_url=analytics_url, timeout=30) as analytics,
    ):

        async def one(i: int) -> None:
            request_id = f"bench-{run_tag}-{i}"
            response = await tokens.post(
                "/api/v1/tokens/consume",
                headers={**headers, "X-Request-Id": request_id},
                json={"userId": user_id, "provider": "openai", "tokens": 10, "prompt": "bench"},
            )
            if response.status_code == 200:
                answered[request_id] = time.perf_counter()

        async def send() -> None:
            started = time.perf_counter()
            tasks = []
            for i in range(total):
                delay = started + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)

        async def poll() -> None:
            if not poll_usage:
                await sender
                await asyncio.sleep(2.0)  # let the pipeline drain
                return
            deadline = time.monotonic() + seconds + STEP_TIMEOUT
            while time.monotonic() < deadline:
                response = await analytics.get(
                    "/api/v1/analytics/usage",
                    params={"provider": "openai", "limit": 50},
                    headers=headers,
                )
                now = time.perf_counter()
                for item in response.json().get("items", []):
                    rid = item.get("requestId")
                    if rid and rid not in seen:
                        seen[rid] = now
                if sender.done() and set(answered) <= set(seen):
                    return
                await asyncio.sleep(POLL_SECONDS)

        sender = asyncio.create_task(send())
        await asyncio.gather(sender, poll())
    delays = [max(0.0, seen[rid] - at) for rid, at in answered.items() if rid in seen]
    return user_id, delays, len(answered)


async def _row_delays(analytics_url: str, user_id: str) -> list[float]:
    """received_at - occurred_at of one user's stored events (one clock: this machine's)."""
    query = "SELECT occurred_at, received_at FROM usage_event WHERE user_id = "
    if analytics_url.startswith("sqlite"):
        with sqlite3.connect(analytics_url.split("///", 1)[1]) as conn:
            # SQLAlchemy keeps UUIDs in SQLite as 32 hex digits
            found = conn.execute(query + "?", (uuid.UUID(user_id).hex,)).fetchall()
            rows = [(datetime.fromisoformat(a), datetime.fromisoformat(b)) for a, b in found]
    else:
        import asyncpg

        conn = await asyncpg.connect(
            analytics_url.replace("postgresql+asyncpg://", "postgresql://")
        )
        try:
            found_pg = await conn.fetch(query + "$1", uuid.UUID(user_id))
            rows = [(r[0], r[1]) for r in found_pg]
        finally:
            await conn.close()
    return [max(0.0, (b - a).total_seconds()) for a, b in rows]


def delay(shape: str, rate: float, seconds: float) -> dict[str, float]:
    databases: dict[str, str] = {}
    extra = {
        "LEAKY_ADMIN_USERNAME": "bench_admin",
        "LEAKY_ADMIN_PASSWORD": "bench-password",
        "LEAKY_TOKENS__BUCKET_CAPACITY": "1000000000",
        "LEAKY_TOKENS__BUCKET_LEAK_PER_SECOND": "1000000000",
    }
    if shape == "distributed":
        databases = asyncio.run(_fresh_pg_databases())
        extra.update({f"LEAKY_{s.upper()}__DATABASE_URL": u for s, u in databases.items()})
        extra["REDIS_URL"] = REDIS
        extra["LEAKY_EVENTS__STREAM_PREFIX"] = f"lt:bench:{uuid.uuid4().hex[:8]}:"
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        analytics_url = databases.get(
            "analytics", f"sqlite+aiosqlite:///{workdir / 'var' / 'analytics.db'}"
        )
        proc = None
        try:
            proc, ports = _start(
                ["up", "--skip", "gateway,qwen,gemini"], workdir, _base_env(workdir, extra)
            )
            # the pipeline's own delay, from the rows, with nothing else running
            quiet_user, _, _ = asyncio.run(
                _steady_load(ports, rate, seconds, uuid.uuid4().hex[:6], poll_usage=False)
            )
            rows = asyncio.run(_row_delays(analytics_url, quiet_user))
            # what a client sees: first appearance in /usage (the poller is load too)
            _, delays, answered = asyncio.run(
                _steady_load(ports, rate, seconds, uuid.uuid4().hex[:6], poll_usage=True)
            )
        finally:
            if proc is not None:
                _stop(proc)
            if databases:
                asyncio.run(_drop(databases))
            if shape == "distributed":
                asyncio.run(_delete_streams(extra["LEAKY_EVENTS__STREAM_PREFIX"]))
    return {
        "answered": answered,
        "seen": len(delays),
        "p50_ms": statistics.median(delays) * 1000,
        "p99_ms": _percentile(delays, 0.99) * 1000,
        "rows_p50_ms": statistics.median(rows) * 1000,
        "rows_p99_ms": _percentile(rows, 0.99) * 1000,
    }


def _median_of(runs: int, measure: Callable[[], Any]) -> list[Any]:
    return [measure() for _ in range(runs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=100.0, help="consumes per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    servers = _answers(5432) and _answers(6379)
    if not servers:
        print(f"PostgreSQL/Redis not answering ({PG_ADMIN}, {REDIS}): SQLite + HTTP only")

    combos = [
        ("sqlite", "http"),
        ("postgresql", "redis"),
        ("sqlite", "redis"),
        ("postgresql", "http"),
    ]
    for database, transport in combos:
        if (database == "postgresql" or transport == "redis") and not servers:
            continue
        results = _median_of(
            args.runs, lambda d=database, t=transport: throughput(d, t, args.events)
        )
        stored = statistics.median(r[0] for r in results)
        sent = statistics.median(r[1] for r in results)
        print(
            f"pipeline {database:<10} + {transport:<5} outbox -> stored row:"
            f" {stored:>8.0f} events/s"
            f"  (relay sent {sent:.0f}/s; {args.events} events, median of {args.runs})"
        )

    for shape in ("embedded", "distributed"):
        if shape == "distributed" and not servers:
            continue
        runs = _median_of(args.runs, lambda s=shape: delay(s, args.rate, args.seconds))
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"delay {shape:<11} consume -> visible in /usage at {args.rate:g}/s: "
            f"p50 {med['p50_ms']:.1f} ms  p99 {med['p99_ms']:.1f} ms"
            f"  (stored rows, no poller: p50 {med['rows_p50_ms']:.1f} ms"
            f" p99 {med['rows_p99_ms']:.1f} ms;"
            f" {int(med['seen'])}/{int(med['answered'])} seen, median of {args.runs})"
        )


if __name__ == "__main__":
    main()
