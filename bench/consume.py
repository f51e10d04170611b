"""Benchmark of /consume straight at the token service, with the stub provider, against a real
`leaky-tokens up` (embedded: SQLite + memory; distributed: PostgreSQL + Redis). The stub's own
/chat is measured in the same run as the baseline."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench import wrk
from bench.load import LoadResult

PG_ADMIN = os.environ.get("LEAKY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("LEAKY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _env(workdir: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAKY_") and k != "REDIS_URL"}
    env.update(
        {
            "LEAKY_DATA_DIR": str(workdir / "var"),
            "LEAKY_ACCESS_LOG": "false",
            "LEAKY_LOG_LEVEL": "warning",
            "LEAKY_ADMIN_USERNAME": "bench_admin",
            "LEAKY_ADMIN_PASSWORD": "bench-password",
            "LEAKY_TOKENS__BUCKET_CAPACITY": "1000000000",
            "LEAKY_TOKENS__BUCKET_LEAK_PER_SECOND": "1000000000",
        }
    )
    for service in ("gateway", "auth", "tokens", "analytics", "qwen", "gemini", "openai"):
        env[f"LEAKY_PORTS__{service.upper()}"] = "0"
    env.update(extra)
    return env


def _start(workdir: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ready = workdir / "ready.json"
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
        stderr=(workdir / "log.txt").open("wb"),
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError((workdir / "log.txt").read_text()[-2000:])
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())["ports"]


async def _prepare(ports: dict[str, int]) -> tuple[str, str]:
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
                json={"username": name, "email": f"{name}@example.com", "password": "password123"},
            )
        ).json()
        response = await client.put(
            f"{tokens}/api/v1/tokens/quota",
            headers={"Authorization": f"Bearer {admin}"},
            json={"userId": user["userId"], "provider": "openai", "totalTokens": 10**12},
        )
        response.raise_for_status()
    return user["userId"], user["token"]


async def _measure(
    ports: dict[str, int], label: str, requests: int, concurrency: int
) -> list[LoadResult]:
    user_id, token = await _prepare(ports)
    headers = {"Authorization": f"Bearer {token}"}
    body: dict[str, Any] = {
        "userId": user_id,
        "provider": "openai",
        "tokens": 10,
        "prompt": "benchmark prompt",
    }
    stub_url = f"http://127.0.0.1:{ports['openai']}/api/v1/openai/chat"
    consume_url = f"http://127.0.0.1:{ports['tokens']}/api/v1/tokens/consume"
    results = []
    tokens = f"http://127.0.0.1:{ports['tokens']}"
    auth = f"http://127.0.0.1:{ports['auth']}"
    quota_url = f"{tokens}/api/v1/tokens/quota?userId={user_id}&provider=openai"
    for name, method, url, hdrs, payload in (
        (f"{label}: stub /chat (baseline)", "POST", stub_url, {}, {"prompt": "benchmark"}),
        (f"{label}: /consume", "POST", consume_url, headers, body),
        (f"{label}: GET /tokens/quota", "GET", quota_url, headers, None),
        (f"{label}: GET /tokens/status", "GET", f"{tokens}/api/v1/tokens/status", {}, None),
        (f"{label}: GET /auth/health", "GET", f"{auth}/api/v1/auth/health", {}, None),
        (f"{label}: GET /oauth2/jwks", "GET", f"{auth}/oauth2/jwks", {}, None),
    ):
        figures = wrk.run_wrk(
            url, method=method, body=payload, headers=hdrs, connections=concurrency
        )
        results.append(
            LoadResult(
                name=name,
                requests=int(figures["requests"]),
                concurrency=concurrency,
                seconds=figures["requests"] / figures["rps"],
                statuses={"non2xx": int(figures["non2xx"])},  # type: ignore[dict-item]
                p50_ms=figures["p50_ms"],
                p95_ms=figures["p95_ms"],
                p99_ms=figures["p99_ms"],
            )
        )
    return results


async def _fresh_pg_databases() -> dict[str, str]:
    import asyncpg

    urls = {}
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        for service in ("auth", "tokens", "analytics"):
            name = f"lt_bench_{service}_{uuid.uuid4().hex[:8]}"
            await conn.execute(f'CREATE DATABASE "{name}"')
            base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
            urls[service] = f"{base}/{name}"
    finally:
        await conn.close()
    return urls


async def _drop(urls: dict[str, str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN)
    try:
        for url in urls.values():
            await conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await conn.close()


def run(shape: str, requests: int, concurrency: int) -> list[LoadResult]:
    extra: dict[str, str] = {}
    databases: dict[str, str] = {}
    if shape == "distributed":
        databases = asyncio.run(_fresh_pg_databases())
        extra = {f"LEAKY_{s.upper()}__DATABASE_URL": u for s, u in databases.items()}
        extra["REDIS_URL"] = REDIS
    with tempfile.TemporaryDirectory() as tmp:
        proc, ports = _start(Path(tmp), _env(Path(tmp), extra))
        try:
            return asyncio.run(_measure(ports, shape, requests, concurrency))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
            if databases:
                asyncio.run(_drop(databases))
