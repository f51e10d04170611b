"""TS-4 latency of the agent API (issue 13): P95 of GET /v1/health, GET /v1/account/info and
GET /v1/sessions/{id} through a real `leaky-tokens up`, against the aims in settings
(`agents.p95_health_ms`, `agents.p95_account_info_ms`, `agents.p95_session_get_ms`).

Run alone: `python -m bench.bench_agents [--seconds 5] [--connections 8]`; `make bench` runs it
with the other figures. The agent API's own rate limit is lifted for the run."""

from __future__ import annotations

import argparse
import asyncio
import json
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
from bench.consume import REDIS, _drop, _env, _fresh_pg_databases
from leaky_tokens.settings import AgentSettings

_LIFTED = {
    "LEAKY_AGENTS__RATE_LIMIT_REQUESTS": "1000000000",
    "LEAKY_GATEWAY__ADDRESS_LIMIT_REQUESTS": "1000000000",
}


def _start(workdir: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ready = workdir / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "leaky_tokens.cli", "up", "--ready-file", str(ready)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "log.txt").open("wb"),
    )
    deadline = time.monotonic() + 90
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError((workdir / "log.txt").read_text()[-2000:])
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())["ports"]


def _prepare(gateway: str) -> tuple[str, str]:
    """An agent with a funded, active session: (its API key, the session id)."""
    with httpx.Client(base_url=gateway, timeout=30) as client:
        agent = client.post("/v1/account/register", json={"name": f"bench_{uuid.uuid4().hex[:8]}"})
        agent.raise_for_status()
        key = {"X-API-Key": agent.json()["data"]["api_key"]}
        order = client.post(
            "/v1/billing/recharge",
            headers={**key, "Idempotency-Key": uuid.uuid4().hex},
            json={"provider": "openai", "tokens": 100_000},
        )
        order.raise_for_status()
        order_id = order.json()["data"]["order_id"]
        deadline = time.monotonic() + 60
        while (
            client.get(f"/v1/billing/recharge/{order_id}/status", headers=key).json()["data"][
                "status"
            ]
            != "completed"
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the recharge order did not complete")
            time.sleep(0.1)
        session = client.post(
            "/v1/sessions",
            headers={**key, "Idempotency-Key": uuid.uuid4().hex},
            json={"product_no": "dynamic-chat", "token_budget": 1000},
        )
        session.raise_for_status()
        return key["X-API-Key"], session.json()["data"]["session_id"]


def run(shape: str, seconds: int = 5, connections: int = 8) -> list[dict[str, Any]]:
    aims = AgentSettings()
    extra = dict(_LIFTED)
    databases: dict[str, str] = {}
    if shape == "distributed":
        databases = asyncio.run(_fresh_pg_databases())
        extra.update({f"LEAKY_{s.upper()}__DATABASE_URL": u for s, u in databases.items()})
        extra["REDIS_URL"] = REDIS
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            proc, ports = _start(Path(tmp), _env(Path(tmp), extra))
            try:
                gateway = f"http://127.0.0.1:{ports['gateway']}"
                api_key, session_id = _prepare(gateway)
                for name, path, headers, aim in (
                    ("GET /v1/health", "/v1/health", {}, aims.p95_health_ms),
                    (
                        "GET /v1/account/info",
                        "/v1/account/info",
                        {"X-API-Key": api_key},
                        aims.p95_account_info_ms,
                    ),
                    (
                        "GET /v1/sessions/{id}",
                        f"/v1/sessions/{session_id}",
                        {"X-API-Key": api_key},
                        aims.p95_session_get_ms,
                    ),
                ):
                    figures = wrk.run_wrk(
                        gateway + path, headers=headers, connections=connections, seconds=seconds
                    )
                    rows.append(
                        {
                            "shape": shape,
                            "request": name,
                            "connections": connections,
                            "rps": round(figures["rps"], 1),
                            "p50_ms": round(figures["p50_ms"], 2),
                            "p95_ms": round(figures["p95_ms"], 2),
                            "p99_ms": round(figures["p99_ms"], 2),
                            "non2xx": int(figures["non2xx"]),
                            "p95_aim_ms": aim,
                            "within_aim": figures["p95_ms"] <= aim and not figures["non2xx"],
                        }
                    )
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    finally:
        if databases:
            asyncio.run(_drop(databases))
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        verdict = "within aim" if r["within_aim"] else "OVER AIM"
        print(
            f"agents  {r['shape']:<11} {r['request']:<24} c={r['connections']:<3} "
            f"{r['rps']:>7.0f}/s  p50 {r['p50_ms']:.2f} ms  p95 {r['p95_ms']:.2f} ms "
            f"(aim {r['p95_aim_ms']:.0f} ms: {verdict})"
            + (f"  non-2xx {r['non2xx']}" if r["non2xx"] else "")
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--shape", choices=["embedded", "distributed"], action="append")
    args = parser.parse_args()
    rows = [
        row
        for shape in args.shape or ["embedded"]
        for row in run(shape, args.seconds, args.connections)
    ]
    print_rows(rows)


if __name__ == "__main__":
    main()
