"""`python -m bench.retention [--shape sqlite|postgresql] [--rows 1000000] [--outbox-only]
[--sweep-duty-cycle D]`: retention on a million rows (issue 10).

1. Fills the token service's outbox with `rows` rows published two days ago and analytics with
   `rows` usage events over the last 30 days, by bulk SQL (bench/bulk.py), and times that.
2. /consume throughput of a real token service (`leaky-tokens up --skip gateway,analytics`,
   relay off) without the sweeper, then with the sweeper purging the million rows (retention
   1 day, 1000 rows per DELETE at most, paced by the duty cycle): the sweeper's rows/s, from
   its own counter at /metrics.
3. /usage latency on the million events (in-process service calls): the first page, a page
   500 000 events deep by cursor and by offset; /report over 24 h before and after the
   roll-up, and the roll-up's own rows/s.

Figures go to stdout and bench/results/retention-<shape>.json. Loopback only, bounded in time;
run it on a quiet machine and say how quiet it was (the load average is recorded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

from bench.bulk import fill_outbox, fill_usage_events
from leaky_tokens.analytics.retention import Retention, RetentionConfig
from leaky_tokens.analytics.service import AnalyticsService, UsageCursor, encode_cursor
from leaky_tokens.shared.clock import SystemClock
from leaky_tokens.shared.database import Database
from leaky_tokens.shared.migrations import upgrade_database
from leaky_tokens.shared.pacing import Pacing
from leaky_tokens.shared.principal import Principal

RESULTS = Path(__file__).resolve().parent / "results"
PG_ADMIN = os.environ.get("LEAKY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


async def _fresh_pg(service: str) -> str:
    import asyncpg

    name = f"lt_bench_ret_{service}_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://") + f"/{name}"


async def _drop_pg(url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await conn.close()


def _start_tokens(
    workdir: Path, tokens_url: str, *, sweeper: bool, sweep_env: dict[str, str] | None = None
) -> tuple[Any, dict[str, int]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAKY_") and k != "REDIS_URL"}
    env.update(
        {
            "LEAKY_DATA_DIR": str(workdir / "var"),
            "LEAKY_ACCESS_LOG": "false",
            "LEAKY_LOG_LEVEL": "warning",
            "LEAKY_ADMIN_USERNAME": "bench_admin",
            "LEAKY_ADMIN_PASSWORD": "bench-password",
            "LEAKY_TOKENS__DATABASE_URL": tokens_url,
            "LEAKY_TOKENS__BUCKET_CAPACITY": "1000000000",
            "LEAKY_TOKENS__BUCKET_LEAK_PER_SECOND": "1000000000",
            "LEAKY_EVENTS__TRANSPORT": "http",
            "LEAKY_EVENTS__RELAY_ENABLED": "false",
            "LEAKY_EVENTS__OUTBOX_SWEEP_ENABLED": "true" if sweeper else "false",
            "LEAKY_EVENTS__OUTBOX_RETENTION_SECONDS": "86400",
            "LEAKY_EVENTS__OUTBOX_SWEEP_EVERY_SECONDS": "0.5",
        }
    )
    env.update(sweep_env or {})
    for service in ("gateway", "auth", "tokens", "analytics", "qwen", "gemini", "openai"):
        env[f"LEAKY_PORTS__{service.upper()}"] = "0"
    ready = workdir / f"ready-{time.monotonic_ns()}.json"
    log = (workdir / "log.txt").open("ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "leaky_tokens.cli",
            "up",
            "--skip",
            "gateway,analytics",
            "--ready-file",
            str(ready),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError((workdir / "log.txt").read_text()[-2000:])
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())["ports"]


def _stop(proc: Any) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


async def _consumer(ports: dict[str, int]) -> tuple[str, dict[str, str], str]:
    auth = f"http://127.0.0.1:{ports['auth']}"
    tokens = f"http://127.0.0.1:{ports['tokens']}"
    async with httpx.AsyncClient(timeout=30) as client:
        admin = (
            await client.post(
                f"{auth}/api/v1/auth/login",
                json={"username": "bench_admin", "password": "bench-password"},
            )
        ).json()["token"]
        name = f"bench_{uuid.uuid4().hex[:8]}"
        user = (
            await client.post(
                f"{auth}/api/v1/auth/register",
                json={
                    "username": name,
                    "email": f"{name}@example.com",
                    "password": "Bench-pass-4821!",
                },
            )
        ).json()
        answer = await client.put(
            f"{tokens}/api/v1/tokens/quota",
            headers={"Authorization": f"Bearer {admin}"},
            json={"userId": user["userId"], "provider": "openai", "totalTokens": 10**12},
        )
        answer.raise_for_status()
    return user["userId"], {"Authorization": f"Bearer {user['token']}"}, tokens


async def _consume_load(
    ports: dict[str, int], seconds: float, concurrency: int, until: Any = None
) -> dict[str, float]:
    """Consumes for `seconds` (or until `until()` is true), `concurrency` at a time."""
    user_id, headers, tokens = await _consumer(ports)
    body = {"userId": user_id, "provider": "openai", "tokens": 10, "prompt": "benchmark"}
    latencies: list[float] = []
    failures = 0
    stop_at = time.monotonic() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failures
        while time.monotonic() < stop_at and not (until is not None and until()):
            started = time.perf_counter()
            response = await client.post(
                f"{tokens}/api/v1/tokens/consume", json=body, headers=headers
            )
            latencies.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                failures += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        began = time.monotonic()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.monotonic() - began
    latencies.sort()
    return {
        "requests": len(latencies),
        "failures": failures,
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2], 2) if latencies else 0.0,
        "p95_ms": round(latencies[int(len(latencies) * 0.95)], 2) if latencies else 0.0,
        "seconds": round(elapsed, 1),
    }


async def _purged(tokens: str) -> float:
    async with httpx.AsyncClient(timeout=30) as client:
        body = (await client.get(f"{tokens}/metrics")).text
    for line in body.splitlines():
        if line.startswith("tokens_outbox_purged_events_total "):
            return float(line.split()[1])
    return 0.0


async def _timed(call: Any, repeat: int = 5) -> float:
    """Median milliseconds of `repeat` calls."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await call()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 2)


async def _usage_figures(url: str, rows: int) -> dict[str, Any]:
    db = Database(url, inline=False)
    service = AnalyticsService(db, SystemClock())
    admin = Principal(user_id=uuid.uuid4(), roles=frozenset({"USER", "ADMIN"}))
    figures: dict[str, Any] = {}
    try:
        deep = rows // 2 // 3  # openai is a third of the rows; half-way into them
        async with db.read() as session:
            found = (
                await session.execute(
                    text(
                        "SELECT occurred_at, id FROM usage_event WHERE provider = 'openai' "
                        "ORDER BY occurred_at DESC, id DESC LIMIT 1 OFFSET :deep"
                    ),
                    {"deep": deep},
                )
            ).one()
        at = found[0] if isinstance(found[0], datetime) else datetime.fromisoformat(found[0])
        at = at.replace(tzinfo=UTC) if at.tzinfo is None else at
        cursor = encode_cursor(UsageCursor(at, int(found[1]), deep // 200 + 2))
        figures["usage_first_page_ms"] = await _timed(
            lambda: service.usage(admin, "openai", limit=200)
        )
        figures["usage_deep_cursor_page_ms"] = await _timed(
            lambda: service.usage(admin, "openai", limit=200, cursor=cursor)
        )
        figures["usage_deep_offset_page_ms"] = await _timed(
            lambda: service.usage(admin, "openai", limit=200, page=deep // 200 + 2), repeat=3
        )
        figures["usage_deep_page_events"] = deep
        figures["report_24h_raw_ms"] = await _timed(
            lambda: service.report(admin, "openai", window_minutes=1440, by_model=True)
        )
        retention = Retention(
            db,
            SystemClock(),
            config=RetentionConfig(
                raw_retention_seconds=86_400,
                batch=5000,
                # the roll-up's own speed: unpaced (the service paces it, see README)
                pacing=Pacing(duty_cycle=1.0, pause_seconds=0, slow_batch_seconds=3600),
            ),
        )
        started = time.monotonic()
        totals = await retention.sweep_once()
        elapsed = time.monotonic() - started
        figures["rollup_events"] = totals.rolled_up
        figures["rollup_steps"] = totals.steps
        figures["rollup_rows_per_s"] = round(totals.rolled_up / elapsed, 1)
        figures["report_24h_after_rollup_ms"] = await _timed(
            lambda: service.report(admin, "openai", window_minutes=1440, by_model=True)
        )
        figures["top_7d_after_rollup_ms"] = await _timed(
            lambda: service.top(admin, None, window_minutes=10080)
        )
        figures["timeseries_7d_after_rollup_ms"] = await _timed(
            lambda: service.timeseries(admin, None, window_minutes=10080)
        )
    finally:
        await db.dispose()
    return figures


async def run(
    shape: str,
    rows: int,
    consume_seconds: float,
    concurrency: int,
    *,
    sweep_env: dict[str, str] | None = None,
    usage: bool = True,
) -> dict[str, Any]:
    figures: dict[str, Any] = {"shape": shape, "rows": rows, "load_before": os.getloadavg()}
    figures["sweep_settings"] = sweep_env or {}
    workdir = Path(tempfile.mkdtemp(prefix="lt-bench-retention-"))
    if shape == "postgresql":
        tokens_url, analytics_url = await _fresh_pg("tokens"), await _fresh_pg("analytics")
    else:
        tokens_url = f"sqlite+aiosqlite:///{workdir / 'tokens.db'}"
        analytics_url = f"sqlite+aiosqlite:///{workdir / 'analytics.db'}"
    try:
        await upgrade_database(tokens_url, "tokens")
        await upgrade_database(analytics_url, "analytics")
        now = datetime.now(UTC)
        tokens_db = Database(tokens_url)
        started = time.monotonic()
        await fill_outbox(tokens_db, rows, now - timedelta(days=3), now - timedelta(days=2))
        figures["fill_outbox_s"] = round(time.monotonic() - started, 1)
        await tokens_db.dispose()
        if usage:
            analytics_db = Database(analytics_url)
            started = time.monotonic()
            await fill_usage_events(analytics_db, rows, now - timedelta(days=30), now)
            figures["fill_usage_events_s"] = round(time.monotonic() - started, 1)
            await analytics_db.dispose()
        print(json.dumps(figures), flush=True)

        proc, ports = _start_tokens(workdir, tokens_url, sweeper=False)
        try:
            figures["consume_without_sweeper"] = await _consume_load(
                ports, consume_seconds, concurrency
            )
        finally:
            _stop(proc)
        print(json.dumps(figures), flush=True)

        proc, ports = _start_tokens(workdir, tokens_url, sweeper=True, sweep_env=sweep_env)
        tokens = f"http://127.0.0.1:{ports['tokens']}"
        try:
            # measured from the first reading (the sweep starts with the service)
            first = await _purged(tokens)
            purged = {"n": first}
            began = time.monotonic()
            done_at: dict[str, float] = {}

            async def watch() -> None:
                while purged["n"] < rows and time.monotonic() - began < 600:
                    purged["n"] = await _purged(tokens)
                    if purged["n"] >= rows:
                        done_at["t"] = time.monotonic()
                    await asyncio.sleep(0.5)

            watcher = asyncio.create_task(watch())
            figures["consume_with_sweeper"] = await _consume_load(
                ports, 600, concurrency, until=lambda: purged["n"] >= rows
            )
            await watcher
            elapsed = done_at.get("t", time.monotonic()) - began
            figures["sweeper_purged"] = purged["n"]
            figures["sweeper_purged_before_first_reading"] = first
            figures["sweeper_seconds"] = round(elapsed, 1)
            figures["sweeper_rows_per_s"] = round((purged["n"] - first) / elapsed, 1)
        finally:
            _stop(proc)
        print(json.dumps(figures), flush=True)

        if usage:
            figures.update(await _usage_figures(analytics_url, rows))
        figures["load_after"] = os.getloadavg()
    finally:
        if shape == "postgresql":
            await _drop_pg(tokens_url)
            await _drop_pg(analytics_url)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--consume-seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--sweep-duty-cycle", type=float, help="events.outbox_sweep_duty_cycle (default: 0.1)"
    )
    parser.add_argument(
        "--outbox-only", action="store_true", help="skip the analytics (/usage, roll-up) part"
    )
    args = parser.parse_args()
    sweep_env = {}
    if args.sweep_duty_cycle is not None:
        sweep_env["LEAKY_EVENTS__OUTBOX_SWEEP_DUTY_CYCLE"] = str(args.sweep_duty_cycle)
    figures = asyncio.run(
        run(
            args.shape,
            args.rows,
            args.consume_seconds,
            args.concurrency,
            sweep_env=sweep_env,
            usage=not args.outbox_only,
        )
    )
    print(json.dumps(figures, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"retention-{args.shape}.json").write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
