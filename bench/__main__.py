"""`make bench`: every benchmark, figures printed and written to bench/results/latest.json.

Loopback only, bounded in requests and time. Run on a quiet machine; compare ratios to the
baseline measured in the same run rather than absolute numbers across machines."""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import (
    bench_agents,
    bench_gateway,
    bench_idempotency,
    bench_inference,
    ceiling,
    consume,
    wrk,
)

RESULTS = Path(__file__).resolve().parent / "results"


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5):
            return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; the median counts")
    args = parser.parse_args()
    if not wrk.available():
        sys.exit("wrk is not installed: `make bench` installs it")

    report: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.python_implementation()} "
        f"{platform.python_version()}",
        "figures": [],
        "load_generator": ceiling.measure(),
    }
    print(f"load generator: {report['load_generator']}")
    bucket = subprocess.run(
        [sys.executable, "-m", "bench.bench_leaky_bucket"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    print(bucket.stdout.strip())
    report["leaky_bucket"] = bucket.stdout.strip().splitlines()
    pipeline = subprocess.run(
        [sys.executable, "-m", "bench.bench_analytics", "--runs", str(args.runs)],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    print(pipeline.stdout.strip())
    report["analytics_pipeline"] = pipeline.stdout.strip().splitlines()

    shapes = ["embedded"]
    if _answers(5432) and _answers(6379):
        shapes.append("distributed")
    for shape in shapes:
        runs = [consume.run(shape, args.requests, args.concurrency) for _ in range(args.runs)]
        for index in range(len(runs[0])):
            rows = [run[index].row() for run in runs]
            median = {
                "name": rows[0]["name"],
                "runs": len(rows),
                "requests": rows[0]["requests"],
                "concurrency": rows[0]["concurrency"],
                **{
                    k: statistics.median(r[k] for r in rows)
                    for k in ("rps", "p50_ms", "p95_ms", "p99_ms")
                },
                "statuses": rows[-1]["statuses"],
            }
            report["figures"].append(median)
            print(
                f"{median['name']:<40} {median['rps']:>8.1f} req/s  p50 {median['p50_ms']:.2f} ms"
                f"  p95 {median['p95_ms']:.2f} ms  p99 {median['p99_ms']:.2f} ms"
                f"  {median['statuses']}"
            )
    report["gateway"] = [row for shape in shapes for row in bench_gateway.run(shape, args.runs)]
    bench_gateway.print_rows(report["gateway"])
    # /v1/chat/completions through the gateway (metered) against the OpenAI stub alone (issue 11)
    report["inference"] = [bench_inference.run(shape, 5, 16, 200) for shape in shapes]
    for row in report["inference"]:
        bench_inference.print_report(row)
    # Idempotency-Key: replay and claim overhead in µs (issue 12)
    report["idempotency"] = [bench_idempotency.run(shape, 400) for shape in shapes]
    for row in report["idempotency"]:
        bench_idempotency.print_report(row)
    report["agents"] = [row for shape in shapes for row in bench_agents.run(shape)]
    bench_agents.print_rows(report["agents"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2))
    print(f"written to {RESULTS / 'latest.json'}")


if __name__ == "__main__":
    main()
