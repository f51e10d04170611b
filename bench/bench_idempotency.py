"""Idempotent inference (issue 12): what an `Idempotency-Key` costs, in µs, at one connection
straight to the token service (no gateway hop), on `leaky-tokens up` against the OpenAI stub.

- replay overhead: p50 of a replayed /v1/chat/completions (same key and body: auth, one
  claim lookup, the stored answer) minus p50 of `GET /v1/models` (auth and a small answer,
  the floor of any /v1 request);
- claim overhead: p50 of a fresh call with a new key per request (claim row written before,
  answer stored after) minus p50 of the same call without a key;
- and what a replay saves: p50 of the full metered call against the replay's.

Sequential requests over one keep-alive connection, timed with perf_counter; medians of
`--requests` each, so the client's own cost cancels out in the differences.

`python -m bench.bench_idempotency [--requests 400] [--shape embedded]`."""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench.bench_inference import PLAIN, _api_key, _env, _free_port, _start
from bench.consume import REDIS, _drop, _fresh_pg_databases


def _timed(
    client: httpx.Client,
    method: str,
    path: str,
    requests: int,
    body: Any = None,
    key: str | None = None,
    fresh_keys: bool = False,
) -> dict[str, float]:
    times: list[float] = []
    for _ in range(requests):
        headers = {}
        if fresh_keys:
            headers["Idempotency-Key"] = f"bench-{uuid.uuid4()}"
        elif key is not None:
            headers["Idempotency-Key"] = key
        started = time.perf_counter()
        answer = client.request(method, path, json=body, headers=headers)
        elapsed = time.perf_counter() - started
        if answer.status_code != 200:
            raise RuntimeError(f"{method} {path}: {answer.status_code} {answer.text[:200]}")
        times.append(elapsed * 1_000_000)
    times.sort()
    return {
        "p50_us": round(statistics.median(times), 1),
        "p99_us": round(times[min(len(times) - 1, int(len(times) * 0.99))], 1),
        "requests": requests,
    }


def run(shape: str, requests: int) -> dict[str, Any]:
    extra: dict[str, str] = {}
    databases: dict[str, str] = {}
    if shape == "distributed":
        import asyncio

        databases = asyncio.run(_fresh_pg_databases())
        extra = {f"LEAKY_{s.upper()}__DATABASE_URL": u for s, u in databases.items()}
        extra["REDIS_URL"] = REDIS
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        env = _env(workdir, _free_port(), extra)
        stack, ports = _start(["up"], env, workdir, "up")
        try:
            key = _api_key(f"http://127.0.0.1:{ports['gateway']}")
            tokens = f"http://127.0.0.1:{ports['tokens']}"
            headers = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=tokens, headers=headers, timeout=30) as client:
                path = "/v1/chat/completions"
                warm = max(20, requests // 10)
                _timed(client, "POST", path, warm, PLAIN)  # warm up: caches, vocabularies
                _timed(client, "GET", "/v1/models", warm)
                floor = _timed(client, "GET", "/v1/models", requests)
                plain = _timed(client, "POST", path, requests, PLAIN)
                fresh = _timed(client, "POST", path, requests, PLAIN, fresh_keys=True)
                replay_key = f"bench-replay-{uuid.uuid4()}"
                _timed(client, "POST", path, 1, PLAIN, key=replay_key)  # the stored answer
                replay = _timed(client, "POST", path, requests, PLAIN, key=replay_key)
            return {
                "shape": shape,
                "models_floor": floor,
                "plain": plain,
                "fresh_key": fresh,
                "replay": replay,
                "replay_overhead_us": round(replay["p50_us"] - floor["p50_us"], 1),
                "claim_overhead_us": round(fresh["p50_us"] - plain["p50_us"], 1),
                "replay_saves_us": round(plain["p50_us"] - replay["p50_us"], 1),
            }
        finally:
            stack.send_signal(signal.SIGTERM)
            try:
                stack.wait(20)
            except subprocess.TimeoutExpired:
                stack.kill()
            if databases:
                import asyncio

                asyncio.run(_drop(databases))


def print_report(report: dict[str, Any]) -> None:
    shape = report["shape"]
    print(
        f"{shape}: idempotency at c=1 (token service): replay p50 "
        f"{report['replay']['p50_us']:.0f} µs vs GET /v1/models "
        f"{report['models_floor']['p50_us']:.0f} µs -> replay overhead "
        f"{report['replay_overhead_us']:.0f} µs; fresh keyed call "
        f"{report['fresh_key']['p50_us']:.0f} µs vs unkeyed {report['plain']['p50_us']:.0f} µs "
        f"-> claim overhead {report['claim_overhead_us']:.0f} µs; a replay saves "
        f"{report['replay_saves_us']:.0f} µs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--shape", choices=["embedded", "distributed"], default="embedded")
    args = parser.parse_args()
    report = run(args.shape, args.requests)
    print_report(report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
