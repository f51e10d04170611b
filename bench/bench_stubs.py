"""The provider emulators alone: requests/s of plain and streamed chat completions (wrk).

`python -m bench.bench_stubs` starts `leaky-tokens serve openai` and `serve gemini` on free
ports, loads each endpoint for a few seconds at a few connection counts, and prints one line
per figure. The plan's /api/v1/openai/chat is measured beside them as the baseline."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.wrk import available, run_wrk

MESSAGES = [{"role": "user", "content": "Summarise the plot of Hamlet in two sentences."}]
CASES: list[tuple[str, str, str, dict[str, Any], dict[str, str]]] = [
    ("plan chat (baseline)", "openai", "/api/v1/openai/chat", {"prompt": "Hello"}, {}),
    (
        "openai chat plain",
        "openai",
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": MESSAGES},
        {"Authorization": "Bearer sk-bench"},
    ),
    (
        "openai chat streamed",
        "openai",
        "/v1/chat/completions",
        {
            "model": "gpt-4o-mini",
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        {"Authorization": "Bearer sk-bench"},
    ),
    (
        "gemini streamGenerateContent",
        "gemini",
        "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
        {"contents": [{"role": "user", "parts": [{"text": MESSAGES[0]["content"]}]}]},
        {"x-goog-api-key": "bench"},
    ),
]


def _serve(service: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    ready = workdir / f"{service}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAKY_")}
    env.update(
        {"LEAKY_DATA_DIR": str(workdir), "LEAKY_ACCESS_LOG": "false", "LEAKY_LOG_LEVEL": "warning"}
    )
    command = [sys.executable, "-m", "leaky_tokens.cli", "serve", service, "--port", "0"]
    proc = subprocess.Popen(
        [*command, "--ready-file", str(ready)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{service} stub did not start")
        time.sleep(0.05)
    port: int = json.loads(ready.read_text())["ports"][service]
    return proc, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    if not available():
        print("bench_stubs: wrk is not installed; skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        servers = {name: _serve(name, Path(tmp)) for name in ("openai", "gemini")}
        try:
            for label, service, path, body, headers in CASES:
                url = f"http://127.0.0.1:{servers[service][1]}{path}"
                run_wrk(url, method="POST", body=body, headers=headers, seconds=1)  # warm-up
                for connections in args.connections:
                    figures = run_wrk(
                        url,
                        method="POST",
                        body=body,
                        headers=headers,
                        connections=connections,
                        seconds=args.seconds,
                    )
                    print(
                        f"stub {label} c={connections}: {figures['rps']:.0f} req/s, "
                        f"p50 {figures['p50_ms']:.2f} ms, p99 {figures['p99_ms']:.2f} ms, "
                        f"non-2xx {figures['non2xx']}"
                    )
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=10)


if __name__ == "__main__":
    main()
