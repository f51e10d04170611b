"""Gateway overhead: the same request straight at its upstream and through the gateway, in one
run, against a real `leaky-tokens up` (embedded: SQLite + memory limits; distributed:
PostgreSQL + Redis limits). wrk is the load generator.

Two requests: the openai stub's health with an API key (a cheap upstream, so the difference is
the gateway: edge authentication from the cache, one rate-limit decision, the extra hop) and the
token service's quota read with a JWT (verified by the gateway and again by the service). Each
at one connection (added latency) and at 32 (throughput; in the embedded shape the gateway and
its upstream share one process and one core's worth of event loop). Direct and gateway runs
alternate; each figure is the median of `runs`, the added latency the median of the paired
differences. The gateway's limit is set out of reach so every request is a full pass.

CPU: utime+stime of the `up` process tree (/proc) around each run, per completed request. The
embedded shape serves the gateway and its upstreams in that one process, so the gateway's own
CPU per proxied request is the through-the-gateway figure less the direct one (`added_cpu_us`);
the distributed shape's PostgreSQL and Redis are outside it.

    python -m bench.bench_gateway [--runs 3] [--seconds 5] [--shape embedded|distributed]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench import procstat, wrk

PG_ADMIN = os.environ.get("LEAKY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("LEAKY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RESULTS = Path(__file__).resolve().parent / "results"
SERVICES = ("gateway", "auth", "tokens", "analytics", "qwen", "gemini", "openai")
CONNECTIONS = (1, 32)


def _env(workdir: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAKY_") and k != "REDIS_URL"}
    env.update(
        {
            "LEAKY_DATA_DIR": str(workdir / "var"),
            "LEAKY_ACCESS_LOG": "false",
            "LEAKY_LOG_LEVEL": "warning",
            "LEAKY_ADMIN_USERNAME": "bench_admin",
            "LEAKY_ADMIN_PASSWORD": "bench-password",
            "LEAKY_GATEWAY__RATE_LIMIT_REQUESTS": "1000000000",
            "LEAKY_GATEWAY__ADDRESS_LIMIT_REQUESTS": "1000000000",
            "LEAKY_GATEWAY__USER_LIMIT_REQUESTS": "1000000000",
            "LEAKY_GATEWAY__RATE_LIMIT_KEY_PREFIX": f"lt:gw:bench:{uuid.uuid4().hex}:",
        }
    )
    env.update({f"LEAKY_PORTS__{s.upper()}": "0" for s in SERVICES})
    env.update(extra)
    return env


def _start(workdir: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ready = workdir / "ready.json"
    log = (workdir / "log.txt").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "leaky_tokens.cli", "up", "--ready-file", str(ready)],
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
    ports: dict[str, int] = json.loads(ready.read_text())["ports"]
    return proc, ports


def _prepare(ports: dict[str, int]) -> list[dict[str, Any]]:
    """The requests to measure: (name, upstream, path, headers)."""
    auth = f"http://127.0.0.1:{ports['auth']}"
    tokens = f"http://127.0.0.1:{ports['tokens']}"
    with httpx.Client(timeout=30) as client:
        admin = client.post(
            f"{auth}/api/v1/auth/login",
            json={"username": "bench_admin", "password": "bench-password"},
        ).json()["token"]
        name = f"bench_{uuid.uuid4().hex[:8]}"
        user = client.post(
            f"{auth}/api/v1/auth/register",
            json={"username": name, "email": f"{name}@example.com", "password": "password123"},
        ).json()
        bearer = {"Authorization": f"Bearer {user['token']}"}
        key = client.post(
            f"{auth}/api/v1/auth/api-keys",
            headers=bearer,
            json={"userId": user["userId"], "name": "bench"},
        ).json()["rawKey"]
        client.put(
            f"{tokens}/api/v1/tokens/quota",
            headers={"Authorization": f"Bearer {admin}"},
            json={"userId": user["userId"], "provider": "openai", "totalTokens": 10**12},
        ).raise_for_status()
    return [
        {
            "name": "openai stub health, X-Api-Key",
            "upstream": "openai",
            "path": "/api/v1/openai/health",
            "headers": {"X-Api-Key": key},
        },
        {
            "name": "token quota read, Bearer JWT",
            "upstream": "tokens",
            "path": f"/api/v1/tokens/quota?userId={user['userId']}&provider=openai",
            "headers": bearer,
        },
    ]


def _measured(
    pid: int, url: str, headers: dict[str, str], connections: int, seconds: int
) -> dict[str, float]:
    pids = procstat.tree(pid)
    before = procstat.cpu_seconds(pids)
    figures = wrk.run_wrk(url, headers=headers, connections=connections, seconds=seconds)
    cpu = procstat.cpu_seconds(pids) - before
    figures["cpu_us"] = cpu * 1e6 / figures["requests"] if figures["requests"] else 0.0
    return figures


def _measure(
    pid: int, ports: dict[str, int], shape: str, runs: int, seconds: int
) -> list[dict[str, Any]]:
    rows = []
    for case in _prepare(ports):
        for connections in CONNECTIONS:
            direct_url = f"http://127.0.0.1:{ports[case['upstream']]}{case['path']}"
            gateway_url = f"http://127.0.0.1:{ports['gateway']}{case['path']}"
            for url in (direct_url, gateway_url):  # warm both paths (pools, caches)
                wrk.run_wrk(url, headers=case["headers"], connections=connections, seconds=1)
            direct, through = [], []
            for _ in range(runs):
                for url, sink in ((direct_url, direct), (gateway_url, through)):
                    sink.append(_measured(pid, url, case["headers"], connections, seconds))
            rows.append(_row(shape, case["name"], connections, direct, through))
    return rows


def _row(
    shape: str,
    name: str,
    connections: int,
    direct: list[dict[str, float]],
    through: list[dict[str, float]],
) -> dict[str, Any]:
    def median(figures: list[dict[str, float]], key: str) -> float:
        return round(statistics.median(f[key] for f in figures), 3)

    def added(key: str) -> float:
        return round(
            statistics.median(t[key] - d[key] for d, t in zip(direct, through, strict=True)), 3
        )

    return {
        "shape": shape,
        "request": name,
        "connections": connections,
        "runs": len(direct),
        "direct": {k: median(direct, k) for k in ("rps", "p50_ms", "p99_ms", "cpu_us")},
        "gateway": {k: median(through, k) for k in ("rps", "p50_ms", "p99_ms", "cpu_us")},
        "added_p50_ms": added("p50_ms"),
        "added_p99_ms": added("p99_ms"),
        "added_cpu_us": round(added("cpu_us"), 1),
        "non2xx": int(sum(f["non2xx"] for f in direct + through)),
    }


async def _fresh_pg_databases() -> dict[str, str]:
    import asyncpg

    urls = {}
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        for service in ("auth", "tokens", "analytics"):
            name = f"lt_bench_gw_{service}_{uuid.uuid4().hex[:8]}"
            await conn.execute(f'CREATE DATABASE "{name}"')
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


def run(shape: str, runs: int = 3, seconds: int = 5) -> list[dict[str, Any]]:
    """Figures for one shape ("embedded" or "distributed")."""
    extra: dict[str, str] = {}
    databases: dict[str, str] = {}
    if shape == "distributed":
        databases = asyncio.run(_fresh_pg_databases())
        extra = {f"LEAKY_{s.upper()}__DATABASE_URL": u for s, u in databases.items()}
        extra["REDIS_URL"] = REDIS
    try:
        with tempfile.TemporaryDirectory() as tmp:
            proc, ports = _start(Path(tmp), _env(Path(tmp), extra))
            try:
                return _measure(proc.pid, ports, shape, runs, seconds)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)
    finally:
        if databases:
            asyncio.run(_drop(databases))


def print_rows(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        d, g = r["direct"], r["gateway"]
        print(
            f"gateway {r['shape']:<11} {r['request']:<32} c={r['connections']:<3} "
            f"direct p50 {d['p50_ms']:.3f} p99 {d['p99_ms']:.3f} {d['rps']:>7.0f}/s | "
            f"gateway p50 {g['p50_ms']:.3f} p99 {g['p99_ms']:.3f} {g['rps']:>7.0f}/s | "
            f"added p50 {r['added_p50_ms']:+.3f} ms p99 {r['added_p99_ms']:+.3f} ms "
            f"cpu {d['cpu_us']:.0f}->{g['cpu_us']:.0f} us/req (+{r['added_cpu_us']:.0f})"
            + (f"  non-2xx {r['non2xx']}" if r["non2xx"] else "")
        )


def servers_answer() -> bool:
    for port in (5432, 6379):
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                pass
        except OSError:
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--shape", choices=["embedded", "distributed"], action="append")
    args = parser.parse_args()
    if not wrk.available():
        sys.exit("wrk is not installed: `make bench` installs it")
    shapes = args.shape or ["embedded", *(["distributed"] if servers_answer() else [])]
    rows = [row for shape in shapes for row in run(shape, args.runs, args.seconds)]
    print_rows(rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gateway.json").write_text(json.dumps(rows, indent=2))
    print(f"written to {RESULTS / 'gateway.json'}")


if __name__ == "__main__":
    main()
