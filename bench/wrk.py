"""wrk as the load generator (C, on its own core; the Python client tops out near 300 req/s here
and would measure itself). Loopback only, bounded by duration."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import orjson

_REPORT = """
done = function(summary, latency, requests)
  io.write(string.format(
    "RESULT requests=%d seconds=%f p50=%d p95=%d p99=%d non2xx=%d timeouts=%d\\n",
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), summary.errors.status, summary.errors.timeout))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def executable() -> str:
    return shutil.which("wrk") or "wrk"


def lua(method: str = "GET", body: Any = None, headers: dict[str, str] | None = None) -> str:
    """The wrk script that sends this request on every connection."""
    lines = [f'wrk.method = "{method}"']
    if body is not None:
        lines.append(f"wrk.body = [[{orjson.dumps(body).decode()}]]")
        lines.append('wrk.headers["Content-Type"] = "application/json"')
    for name, value in (headers or {}).items():
        lines.append(f'wrk.headers["{name}"] = "{value}"')
    return "\n".join(lines) + "\n"


def run_wrk(
    url: str,
    *,
    method: str = "GET",
    body: Any = None,
    headers: dict[str, str] | None = None,
    connections: int = 32,
    seconds: int = 5,
    timeout: float = 10,
) -> dict[str, float]:
    """rps and p50/p95/p99 latency in ms for one bounded wrk run."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "bench.lua"
        script.write_text(lua(method, body, headers) + _REPORT)
        output = subprocess.run(
            [
                executable(),
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                f"--timeout={timeout}s",
                "-s",
                str(script),
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + timeout + 30,
        ).stdout
    return parse_result(output)


def parse_result(output: str) -> dict[str, float]:
    """The figures of the RESULT line our Lua `done` hook prints."""
    match = re.search(
        r"RESULT requests=(\d+) seconds=([\d.]+) p50=(\d+) p95=(\d+) p99=(\d+) non2xx=(\d+)"
        r" timeouts=(\d+)",
        output,
    )
    if match is None:
        raise RuntimeError(f"wrk gave no result:\n{output}")
    requests, duration = int(match[1]), float(match[2])
    return {
        "rps": requests / duration if duration else 0.0,
        "p50_ms": int(match[3]) / 1000,
        "p95_ms": int(match[4]) / 1000,
        "p99_ms": int(match[5]) / 1000,
        "non2xx": int(match[6]),
        "timeouts": int(match[7]),
        "requests": requests,
    }
