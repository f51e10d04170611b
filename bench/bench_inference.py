"""The OpenAI-compatible /v1/chat/completions through the gateway (metered: API key at the edge,
reservation, bucket, settlement, usage event) against the OpenAI stub alone, in one run.

The stub runs as a process of its own (`serve openai`), everything else as `up --skip openai`,
so the CPU of the serving process (gateway + token service + auth + analytics) is read apart
from the stub's. Figures, plain and streamed:
- requests/s and p50/p99 at `--concurrency` connections (wrk), for the stub alone and through
  the gateway, and CPU-ms per request of the serving process (and of the stub);
- added latency at one connection: p50/p99 through the gateway minus the stub's;
- added time to first chunk at one connection (bench/stream_client.py), p50 and p99.

The token service's /v1 is also loaded directly (no gateway hop), the way /consume is measured
(bench/consume.py), for a like-for-like CPU figure; the serving process here also runs analytics,
which stores every usage event.

`python -m bench.bench_inference [--seconds 5] [--concurrency 16] [--shape embedded]`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench import procstat, stream_client, wrk
from bench.consume import REDIS, _drop, _fresh_pg_databases

MESSAGES = [{"role": "user", "content": "Summarise the plot of Hamlet in two sentences."}]
PLAIN = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 64}
STREAMED = {**PLAIN, "stream": True, "stream_options": {"include_usage": True}}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _env(workdir: Path, openai_port: int, extra: dict[str, str]) -> dict[str, str]:
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
            "LEAKY_GATEWAY__RATE_LIMIT_REQUESTS": "100000000",
            "LEAKY_GATEWAY__USER_LIMIT_REQUESTS": "100000000",
            "LEAKY_GATEWAY__ADDRESS_LIMIT_REQUESTS": "100000000",
        }
    )
    for service in ("gateway", "auth", "tokens", "analytics", "qwen", "gemini"):
        env[f"LEAKY_PORTS__{service.upper()}"] = "0"
    env["LEAKY_PORTS__OPENAI"] = str(openai_port)
    env.update(extra)
    return env


def _start(
    args: list[str], env: dict[str, str], workdir: Path, name: str
) -> tuple[Any, dict[str, int]]:
    ready = workdir / f"{name}.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "leaky_tokens.cli", *args, "--ready-file", str(ready)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(workdir / f"{name}.log").open("wb"),
    )
    deadline = time.monotonic() + 90
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError((workdir / f"{name}.log").read_text()[-2000:])
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())["ports"]


def _api_key(gateway: str) -> str:
    with httpx.Client(base_url=gateway, timeout=30) as client:
        admin = client.post(
            "/api/v1/auth/login", json={"username": "bench_admin", "password": "bench-password"}
        ).json()["token"]
        name = f"bench_{uuid.uuid4().hex[:8]}"
        user = client.post(
            "/api/v1/auth/register",
            json={"username": name, "email": f"{name}@example.com", "password": "password123"},
        ).json()
        key = client.post(
            "/api/v1/auth/api-keys",
            headers={"Authorization": f"Bearer {user['token']}"},
            json={"userId": user["userId"], "name": "bench"},
        ).json()["rawKey"]
        client.put(
            "/api/v1/tokens/quota",
            headers={"Authorization": f"Bearer {admin}"},
            json={"userId": user["userId"], "provider": "openai", "totalTokens": 10**12},
        ).raise_for_status()
    return str(key)


def _load(
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    connections: int,
    seconds: int,
    meter: procstat.CpuMeter,
) -> dict[str, Any]:
    meter.start()
    figures = wrk.run_wrk(
        url, method="POST", body=body, headers=headers, connections=connections, seconds=seconds
    )
    cpu = meter.stop()
    done = max(1, int(figures["requests"]))
    return {
        **{k: figures[k] for k in ("rps", "p50_ms", "p99_ms", "non2xx", "requests")},
        "cpu_ms_per_request": {role: round(s * 1000 / done, 3) for role, s in cpu.items()},
    }


def _first_chunks(port: int, path: str, headers: dict[str, str], requests: int) -> dict[str, float]:
    times = stream_client.measure(
        "127.0.0.1", port, path, headers, orjson.dumps(STREAMED), requests
    )
    ordered = sorted(times.first_chunk_ms)
    return {
        "p50_ms": statistics.median(ordered),
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "ok": len(ordered),
    }


def run(shape: str, seconds: int, concurrency: int, first_chunk_requests: int) -> dict[str, Any]:
    extra: dict[str, str] = {}
    databases: dict[str, str] = {}
    if shape == "distributed":
        import asyncio

        databases = asyncio.run(_fresh_pg_databases())
        extra = {f"LEAKY_{s.upper()}__DATABASE_URL": u for s, u in databases.items()}
        extra["REDIS_URL"] = REDIS
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        port = _free_port()
        env = _env(workdir, port, extra)
        stub, _ = _start(["serve", "openai", "--port", str(port)], env, workdir, "stub")
        stack, ports = _start(["up", "--skip", "openai"], env, workdir, "up")
        try:
            gateway = f"http://127.0.0.1:{ports['gateway']}"
            key = _api_key(gateway)
            meter = procstat.CpuMeter(
                {
                    "serving": lambda: procstat.tree(stack.pid),
                    "stub": lambda: procstat.tree(stub.pid),
                }
            )
            stub_url = f"http://127.0.0.1:{port}/v1/chat/completions"
            gw_url = f"{gateway}/v1/chat/completions"
            stub_headers = {"Authorization": "Bearer sk-bench"}
            gw_headers = {"Authorization": f"Bearer {key}"}
            report: dict[str, Any] = {
                "shape": shape,
                "concurrency": concurrency,
                "seconds": seconds,
            }
            tokens_url = f"http://127.0.0.1:{ports['tokens']}/v1/chat/completions"
            for kind, body in (("plain", PLAIN), ("streamed", STREAMED)):
                stub_load = _load(stub_url, body, stub_headers, concurrency, seconds, meter)
                gw_load = _load(gw_url, body, gw_headers, concurrency, seconds, meter)
                # The token service alone (no gateway hop), as /consume is measured.
                direct = _load(tokens_url, body, gw_headers, concurrency, seconds, meter)
                stub_one = _load(stub_url, body, stub_headers, 1, seconds, meter)
                gw_one = _load(gw_url, body, gw_headers, 1, seconds, meter)
                report[kind] = {
                    "stub": stub_load,
                    "gateway": gw_load,
                    "tokens_direct": direct,
                    "added_p50_ms_at_1": round(gw_one["p50_ms"] - stub_one["p50_ms"], 3),
                    "added_p99_ms_at_1": round(gw_one["p99_ms"] - stub_one["p99_ms"], 3),
                    "gateway_cpu_ms_per_request_at_1": gw_one["cpu_ms_per_request"]["serving"],
                }
            stub_first = _first_chunks(
                port, "/v1/chat/completions", stub_headers, first_chunk_requests
            )
            gw_first = _first_chunks(
                ports["gateway"], "/v1/chat/completions", gw_headers, first_chunk_requests
            )
            report["first_chunk"] = {
                "stub": stub_first,
                "gateway": gw_first,
                "added_p50_ms": round(gw_first["p50_ms"] - stub_first["p50_ms"], 3),
                "added_p99_ms": round(gw_first["p99_ms"] - stub_first["p99_ms"], 3),
            }
            return report
        finally:
            for proc in (stack, stub):
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if databases:
                import asyncio

                asyncio.run(_drop(databases))


def print_report(report: dict[str, Any]) -> None:
    shape = report["shape"]
    for kind in ("plain", "streamed"):
        row = report[kind]
        for role in ("stub", "gateway", "tokens_direct"):
            r = row[role]
            print(
                f"{shape}: /v1 {kind:<8} {role:<13} c={report['concurrency']:<3} "
                f"{r['rps']:>8.1f} req/s  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
                f"CPU-ms/req serving {r['cpu_ms_per_request']['serving']:.3f} "
                f"stub {r['cpu_ms_per_request']['stub']:.3f}  non2xx {r['non2xx']}"
            )
        print(
            f"{shape}: /v1 {kind:<8} added at c=1: p50 {row['added_p50_ms_at_1']:.2f} ms  "
            f"p99 {row['added_p99_ms_at_1']:.2f} ms  serving CPU-ms/req "
            f"{row['gateway_cpu_ms_per_request_at_1']:.3f}"
        )
    first = report["first_chunk"]
    print(
        f"{shape}: /v1 first chunk at c=1: stub p50 {first['stub']['p50_ms']:.2f} ms, gateway "
        f"p50 {first['gateway']['p50_ms']:.2f} ms; added p50 {first['added_p50_ms']:.2f} ms, "
        f"p99 {first['added_p99_ms']:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--first-chunk-requests", type=int, default=200)
    parser.add_argument("--shape", choices=["embedded", "distributed"], default="embedded")
    args = parser.parse_args()
    if not wrk.available():
        sys.exit("wrk is not installed: `make bench` installs it")
    report = run(args.shape, args.seconds, args.concurrency, args.first_chunk_requests)
    print_report(report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
