"""`make bench-compare`: Leaky Tokens beside LiteLLM's proxy, against one OpenAI-format stub.

One run, loopback only, bounded in time (five to six minutes with the defaults):

* one stub process (`bench/openai_stub.py`: our OpenAI stub, with a chat-completions route
  while the stub has none of its own) that every system calls;
* LiteLLM's proxy from bench/.venv (pinned, see bench/venv.py), one uvicorn worker, no database:
  a master key, and a custom auth hook giving each bench key its own `tpm_limit`/`rpm_limit`,
  enforced by LiteLLM's in-memory parallel-request limiter (v3, reserve-then-reconcile);
* Leaky Tokens `up` (every service in one process; the openai stub skipped and pointed at the
  shared stub): the embedded default (SQLite + memory), and PostgreSQL + Redis when they answer.

For every (mode, connections) cell the targets run in turn, A, B, C, A, B, C…, `--runs` times
after a warm-up; each figure is the median of the runs. wrk drives the load (its own ceiling is
measured first); CPU is utime+stime from /proc for each serving process before and after each
run; time to first chunk comes from a one-connection socket client; exactness is 200 concurrent
requests against a token budget that `--budget-requests` requests exhaust.

Leaky Tokens' side is `POST /api/v1/tokens/consume` through the gateway until the token service
serves `POST /v1/chat/completions`; the target is detected, or forced by LEAKY_TARGET below.

    python -m bench.compare [--runs 3] [--seconds 4] [--no-distributed]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench import bench_gateway, ceiling, consume, procstat, stream_client, venv, wrk
from bench.consume import PG_ADMIN, REDIS
from bench.openai_stub import CHAT_COMPLETIONS, main_stub_offers_chat_completions

# None: detect what main offers; "consume" or "chat" to force one (the one-line switch).
LEAKY_TARGET: str | None = None

RESULTS = Path(__file__).resolve().parent / "results"

MODEL = "gpt-4o-mini"
PROMPT = "Say something short about leaky buckets and token budgets."
MAX_TOKENS = 16
CONNECTIONS = (1, 32)
MODES = ("plain", "streamed")
BURST = 200  # concurrent requests of the exactness test
OUT_OF_REACH = 10**9


def chat_body(model: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


# ---------------------------------------------------------------------------------------------
# What is measured, and how the runs are reduced to figures (pure; tested in tests/bench).


@dataclass
class Target:
    """One system at one URL: its request per mode and the processes whose CPU it costs."""

    name: str
    label: str
    url: str
    headers: dict[str, str]
    bodies: dict[str, dict[str, Any]]  # mode -> request body; a missing mode is not offered
    serving: str  # the role whose CPU is the system's own ("" for the stub alone)
    roles: dict[str, Callable[[], Iterable[int]]] = field(default_factory=dict)


def median_of_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell's figure: median rps and latencies over runs; CPU-ms per request for each
    process role as the median over runs of (CPU seconds x 1000 / requests completed)."""
    roles = sorted({role for run in runs for role in run["cpu_s"]})
    per_request: dict[str, float | None] = {}
    for role in roles:
        values = [
            run["cpu_s"].get(role, 0.0) * 1000 / run["requests"] for run in runs if run["requests"]
        ]
        per_request[role] = round(statistics.median(values), 3) if values else None
    return {
        "runs": len(runs),
        "rps": round(statistics.median(run["rps"] for run in runs), 1),
        "p50_ms": round(statistics.median(run["p50_ms"] for run in runs), 3),
        "p99_ms": round(statistics.median(run["p99_ms"] for run in runs), 3),
        "cpu_ms_per_request_by_process": per_request,
        "requests": int(statistics.median(run["requests"] for run in runs)),
        "non2xx": int(sum(run["non2xx"] for run in runs)),
        "timeouts": int(sum(run.get("timeouts", 0) for run in runs)),
    }


def few_requests(cell: dict[str, Any], connections: int) -> bool:
    """Too few completed requests for CPU per request to mean much: the work on the requests
    still in flight when the run ends is counted but they are not."""
    return bool(cell["requests"] < 5 * connections)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of unsorted values; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(min(rank, len(ordered))) - 1]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 2)


def summarise(
    cells: dict[tuple[str, str, int], dict[str, Any]], targets: list[Target]
) -> dict[str, Any]:
    """compare.json's per-target section: for each mode the 32-connection figures at the top
    (rps, cpu_ms_per_request of the system's own processes, p50/p99) and every connection
    count below."""
    out: dict[str, Any] = {}
    for target in targets:
        modes: dict[str, Any] = {}
        for mode in MODES:
            by_connections = {
                str(c): cells[(target.name, mode, c)]
                for c in CONNECTIONS
                if (target.name, mode, c) in cells
            }
            if not by_connections:
                continue
            top = by_connections.get(str(max(CONNECTIONS))) or next(iter(by_connections.values()))
            own = top["cpu_ms_per_request_by_process"]
            modes[mode] = {
                "connections": max(CONNECTIONS),
                "rps": top["rps"],
                "cpu_ms_per_request": own.get(target.serving) if target.serving else None,
                "p50_ms": top["p50_ms"],
                "p99_ms": top["p99_ms"],
                "by_connections": by_connections,
            }
        out[target.name] = {"label": target.label, "url": target.url, **modes}
    return out


# ---------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(proc: subprocess.Popen[bytes], ready: Callable[[], bool], log: Path) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{proc.args!r} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


@contextmanager
def process(
    argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own session, ended (its whole group) on the way out."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def _ready_file(path: Path) -> Callable[[], bool]:
    return path.exists


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LEAKY_") and k != "REDIS_URL"}


def start_stub(stack: ExitStack, workdir: Path) -> tuple[int, int, str]:
    """(pid, port, how) of the one OpenAI-format stub."""
    ready = workdir / "stub-ready.json"
    env = {
        **_base_env(),
        "LEAKY_ACCESS_LOG": "false",
        "LEAKY_LOG_LEVEL": "warning",
        "LEAKY_DATA_DIR": str(workdir / "stub-var"),
    }
    if main_stub_offers_chat_completions():
        argv = [sys.executable, "-m", "leaky_tokens.cli", "serve", "openai"]
        how = "leaky-tokens serve openai"
    else:
        argv = [sys.executable, "-m", "bench.openai_stub"]
        how = "leaky-tokens serve openai + the bench's /v1/chat/completions route"
    log = workdir / "stub.log"
    argv += ["--port", "0", "--ready-file", str(ready)]
    proc = stack.enter_context(process(argv, env, log))
    _wait_ready(proc, _ready_file(ready), log)
    return proc.pid, json.loads(ready.read_text())["ports"]["openai"], how


LITELLM_AUTH = '''"""Bench keys for LiteLLM's proxy without a database, each with its limits."""
import json
import os

from fastapi import HTTPException, Request
from litellm.proxy._types import UserAPIKeyAuth

KEYS = json.loads(os.environ["BENCH_LITELLM_KEYS"])


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    limits = KEYS.get(api_key)
    if limits is None:
        raise HTTPException(status_code=401, detail="unknown key")
    return UserAPIKeyAuth(api_key=api_key, **limits)
'''


def litellm_config(stub_port: int) -> str:
    return f"""model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: http://127.0.0.1:{stub_port}/v1
      api_key: sk-stub
general_settings:
  master_key: sk-bench-master
  custom_auth: bench_litellm_auth.user_api_key_auth
litellm_settings:
  set_verbose: false
"""


def start_litellm(
    stack: ExitStack, workdir: Path, stub_port: int, keys: dict[str, dict[str, int]]
) -> tuple[int, int]:
    """(pid, port) of LiteLLM's proxy, one worker, no database, nothing fetched at run time."""
    home = workdir / "litellm"
    home.mkdir()
    (home / "config.yaml").write_text(litellm_config(stub_port))
    (home / "bench_litellm_auth.py").write_text(LITELLM_AUTH)
    port = free_port()
    env = {
        "PATH": f"{venv.VENV / 'bin'}:/usr/bin:/bin",
        "HOME": str(home),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price list from the internet
        "LITELLM_LOG": "ERROR",
        "BENCH_LITELLM_KEYS": json.dumps(keys),
    }
    argv = [
        str(venv.bin_path("litellm")),
        "--config",
        str(home / "config.yaml"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    log = workdir / "litellm.log"
    proc = stack.enter_context(process(argv, env, log, cwd=home))

    def alive() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health/liveliness", timeout=1).is_success
        except httpx.HTTPError:
            return False

    _wait_ready(proc, alive, log)
    return proc.pid, port


@dataclass
class Leaky:
    shape: str
    pid: int
    ports: dict[str, int]
    databases: list[str]
    redis_prefix: str


def _leaky_env(workdir: Path, stub_port: int, extra: dict[str, str]) -> dict[str, str]:
    # consume's environment (data dir, quiet logs, the bench admin, free ports, the bucket out of
    # reach) with the gateway's limit out of reach too: only the quota pool ever refuses.
    limits = {
        "LEAKY_GATEWAY__RATE_LIMIT_REQUESTS": str(OUT_OF_REACH),
        "LEAKY_URLS__OPENAI": f"http://127.0.0.1:{stub_port}",
    }
    return consume._env(workdir, {**limits, **extra})


async def _delete_redis_keys(prefix: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(REDIS)
    try:
        async for key in client.scan_iter(match=f"{prefix}*", count=500):
            await client.delete(key)
    finally:
        await client.aclose()


def start_leaky(stack: ExitStack, workdir: Path, shape: str, stub_port: int) -> Leaky:
    tag = uuid.uuid4().hex[:8]
    redis_prefix = f"lt:bench:cmp:{tag}:"
    extra: dict[str, str] = {}
    databases: list[str] = []
    if shape == "distributed":
        urls = asyncio.run(consume._fresh_pg_databases())
        databases = [url.rsplit("/", 1)[1] for url in urls.values()]
        stack.callback(lambda: asyncio.run(consume._drop(urls)))
        stack.callback(lambda: asyncio.run(_delete_redis_keys(redis_prefix)))
        extra = {f"LEAKY_{s.upper()}__DATABASE_URL": u for s, u in urls.items()}
        extra["REDIS_URL"] = REDIS
        extra["LEAKY_GATEWAY__RATE_LIMIT_KEY_PREFIX"] = f"{redis_prefix}gw:"
        extra["LEAKY_EVENTS__STREAM_PREFIX"] = f"{redis_prefix}events:"
    home = workdir / f"leaky-{shape}"
    home.mkdir()
    ready = home / "ready.json"
    argv = [sys.executable, "-m", "leaky_tokens.cli", "up", "--skip", "openai"]
    log = home / "log.txt"
    env = _leaky_env(home, stub_port, extra)
    proc = stack.enter_context(process([*argv, "--ready-file", str(ready)], env, log))
    _wait_ready(proc, _ready_file(ready), log)
    return Leaky(shape, proc.pid, json.loads(ready.read_text())["ports"], databases, redis_prefix)


def postgres_backends(databases: list[str]) -> Callable[[], list[int]]:
    """The PostgreSQL backend processes serving our databases (looked up at each reading)."""

    async def query() -> list[int]:
        import asyncpg

        conn = await asyncpg.connect(PG_ADMIN)
        try:
            rows = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = ANY($1::text[])", databases
            )
        finally:
            await conn.close()
        return [int(r["pid"]) for r in rows]

    return lambda: asyncio.run(query())


# ---------------------------------------------------------------------------------------------
# Setting up the clients of Leaky Tokens


@dataclass
class LeakyAccount:
    user_id: str
    api_key: str
    jwt: str


def leaky_account(leaky: Leaky, total_tokens: int) -> LeakyAccount:
    gateway = f"http://127.0.0.1:{leaky.ports['gateway']}"
    with httpx.Client(base_url=gateway, timeout=30) as client:
        admin = client.post(
            "/api/v1/auth/login", json={"username": "bench_admin", "password": "bench-password"}
        )
        admin.raise_for_status()
        name = f"bench_{uuid.uuid4().hex[:8]}"
        user = client.post(
            "/api/v1/auth/register",
            json={"username": name, "email": f"{name}@example.com", "password": "password123"},
        ).json()
        bearer = {"Authorization": f"Bearer {user['token']}"}
        key = client.post(
            "/api/v1/auth/api-keys", headers=bearer, json={"userId": user["userId"], "name": "b"}
        ).json()["rawKey"]
        client.put(
            "/api/v1/tokens/quota",
            headers={"Authorization": f"Bearer {admin.json()['token']}"},
            json={"userId": user["userId"], "provider": "openai", "totalTokens": total_tokens},
        ).raise_for_status()
    return LeakyAccount(user["userId"], key, user["token"])


def leaky_offers_chat(leaky: Leaky) -> bool:
    if LEAKY_TARGET is not None:
        return LEAKY_TARGET == "chat"
    tokens = f"http://127.0.0.1:{leaky.ports['tokens']}"
    paths = httpx.get(f"{tokens}/openapi.json", timeout=10).json().get("paths", {})
    return CHAT_COMPLETIONS in paths


def leaky_model(leaky: Leaky, account: LeakyAccount) -> str:
    """An openai-owned model of Leaky Tokens' catalogue (its /v1/models), else MODEL."""
    gateway = f"http://127.0.0.1:{leaky.ports['gateway']}"
    try:
        models = httpx.get(
            f"{gateway}/v1/models",
            headers={"Authorization": f"Bearer {account.api_key}"},
            timeout=10,
        ).json()["data"]
    except (httpx.HTTPError, KeyError, ValueError):
        return MODEL
    owned = [m["id"] for m in models if m.get("owned_by") == "openai"]
    return MODEL if MODEL in owned or not owned else owned[0]


def leaky_request(
    leaky: Leaky, account: LeakyAccount, chat: bool, tokens_per_request: int
) -> tuple[str, dict[str, str], dict[str, dict[str, Any]]]:
    """(url, headers, body per mode) of the metered call through the gateway."""
    gateway = f"http://127.0.0.1:{leaky.ports['gateway']}"
    if chat:
        model = leaky_model(leaky, account)
        bodies = {mode: chat_body(model, mode == "streamed") for mode in MODES}
        headers = {"Authorization": f"Bearer {account.api_key}"}
        return f"{gateway}{CHAT_COMPLETIONS}", headers, bodies
    body = {
        "userId": account.user_id,
        "provider": "openai",
        "tokens": tokens_per_request,
        "prompt": PROMPT,
    }
    return f"{gateway}/api/v1/tokens/consume", {"X-Api-Key": account.api_key}, {"plain": body}


# ---------------------------------------------------------------------------------------------
# Measuring


def system_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / procstat.TICKS_PER_SECOND


@dataclass
class Others:
    """CPU the rest of the machine used while we measured (other engineers' tests)."""

    busy_s: float = 0.0
    ours_s: float = 0.0
    wall_s: float = 0.0

    @property
    def cores(self) -> float:
        return max(0.0, self.busy_s - self.ours_s) / self.wall_s if self.wall_s else 0.0


def one_run(
    target: Target, mode: str, connections: int, seconds: int, others: Others
) -> dict[str, Any]:
    meter = procstat.CpuMeter(target.roles)
    children_before = _children_cpu()
    busy_before, started = system_busy_seconds(), time.monotonic()
    meter.start()
    figures = wrk.run_wrk(
        target.url,
        method="POST",
        body=target.bodies[mode],
        headers=target.headers,
        connections=connections,
        seconds=seconds,
    )
    cpu = meter.stop()
    others.busy_s += system_busy_seconds() - busy_before
    others.wall_s += time.monotonic() - started
    others.ours_s += sum(cpu.values()) + _children_cpu() - children_before
    settle(target)
    return {**figures, "cpu_s": cpu}


def settle(target: Target, timeout: float = 10.0) -> None:
    """Wait until the target has finished the requests wrk abandoned when it stopped (a slow
    system goes on with them), so they do not compete with the next target's run."""
    role = target.serving or "stub"
    pids = lambda: target.roles[role]()  # noqa: E731
    deadline = time.monotonic() + timeout
    before = procstat.cpu_seconds(pids())
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = procstat.cpu_seconds(pids())
        if now - before < 0.02:  # under a tenth of a core for 200 ms: idle
            return
        before = now


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_cells(
    targets: list[Target], runs: int, seconds: int, others: Others
) -> dict[tuple[str, str, int], dict[str, Any]]:
    cells: dict[tuple[str, str, int], dict[str, Any]] = {}
    for mode in MODES:
        offered = [t for t in targets if mode in t.bodies]
        for target in offered:  # warm-up: pools, caches, lazy imports; not counted
            wrk.run_wrk(
                target.url,
                method="POST",
                body=target.bodies[mode],
                headers=target.headers,
                connections=max(CONNECTIONS),
                seconds=2,
            )
        for connections in CONNECTIONS:
            results: dict[str, list[dict[str, Any]]] = {t.name: [] for t in offered}
            for _ in range(runs):
                for target in offered:  # interleaved: A, B, C, A, B, C, …
                    results[target.name].append(one_run(target, mode, connections, seconds, others))
            for target in offered:
                cell = cells[(target.name, mode, connections)] = median_of_runs(
                    results[target.name]
                )
                print(_cell_line(target, mode, connections, cell))
    return cells


def idle_cores(targets: list[Target], seconds: float = 3.0) -> dict[str, float]:
    """CPU each system's own processes use with no load (background loops, pollers), in cores:
    part of every CPU-ms-per-request figure, the more so the fewer requests a run completes."""
    roles = {t.name: t.roles[t.serving or "stub"] for t in targets}
    meter = procstat.CpuMeter(roles)
    meter.start()
    time.sleep(seconds)
    return {name: round(cpu / seconds, 3) for name, cpu in meter.stop().items()}


def _cell_line(target: Target, mode: str, connections: int, cell: dict[str, Any]) -> str:
    cpu = "  ".join(f"{r} {_fmt(v)}" for r, v in cell["cpu_ms_per_request_by_process"].items())
    flag = f"  non-2xx {cell['non2xx']}" if cell["non2xx"] else ""
    flag += f"  timeouts {cell['timeouts']}" if cell["timeouts"] else ""
    return (
        f"{target.label:<34} {mode:<8} c={connections:<3} {cell['rps']:>8.1f} req/s  "
        f"p50 {cell['p50_ms']:.2f}  p99 {cell['p99_ms']:.2f} ms  CPU-ms/req: {cpu}{flag}"
    )


def first_chunks(targets: list[Target], requests: int) -> dict[str, dict[str, Any]]:
    """Time to first chunk and to the end of streamed answers at one connection,
    interleaved in rounds."""
    streamed = [t for t in targets if "streamed" in t.bodies]
    samples = {t.name: stream_client.StreamTimes() for t in streamed}
    rounds = 4
    for _ in range(rounds):
        for target in streamed:
            url = httpx.URL(target.url)
            body = json.dumps(target.bodies["streamed"]).encode()
            got = stream_client.measure(
                url.host, url.port or 80, url.path, target.headers, body, requests // rounds
            )
            mine = samples[target.name]
            mine.first_chunk_ms += got.first_chunk_ms
            mine.total_ms += got.total_ms
            for status, count in got.statuses.items():
                mine.statuses[status] = mine.statuses.get(status, 0) + count
    return {
        name: {
            "requests": len(s.first_chunk_ms),
            "first_chunk_p50_ms": round(percentile(s.first_chunk_ms, 50), 3),
            "first_chunk_p99_ms": round(percentile(s.first_chunk_ms, 99), 3),
            "complete_p50_ms": round(percentile(s.total_ms, 50), 3),
            "statuses": s.statuses,
        }
        for name, s in samples.items()
    }


async def burst(url: str, headers: dict[str, str], body: dict[str, Any]) -> list[httpx.Response]:
    """BURST requests at once, each on its own connection."""
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(
            *(client.post(url, headers=headers, json=body) for _ in range(BURST))
        )


def usage_tokens(response: httpx.Response) -> int:
    """total_tokens an answer reports (OpenAI's usage, or /consume's provider usage)."""
    try:
        data = response.json()
    except ValueError:
        return 0
    usage = data.get("usage") or (data.get("providerResponse") or {}).get("usage") or {}
    return int(usage.get("total_tokens") or usage.get("totalTokens") or 0)


def exactness_row(
    responses: list[httpx.Response], budget: int, tokens_charged: int | None
) -> dict[str, Any]:
    statuses = Counter(r.status_code for r in responses)
    admitted = [r for r in responses if r.status_code == 200]
    passed = sum(usage_tokens(r) for r in admitted)
    return {
        "requests": len(responses),
        "admitted": len(admitted),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "budget_tokens": budget,
        "tokens_in_admitted_answers": passed,
        "tokens_charged": tokens_charged,
    }


def leaky_exactness(
    leaky: Leaky, chat: bool, tokens_per_request: int, budget_requests: int
) -> dict[str, Any]:
    budget = budget_requests * tokens_per_request
    account = leaky_account(leaky, budget)
    url, headers, bodies = leaky_request(leaky, account, chat, tokens_per_request)
    responses = asyncio.run(burst(url, headers, bodies["plain"]))
    gateway = f"http://127.0.0.1:{leaky.ports['gateway']}"
    remaining = None
    for _ in range(3):  # a loaded machine can time the read out at the gateway
        quota = httpx.get(
            f"{gateway}/api/v1/tokens/quota",
            params={"userId": account.user_id, "provider": "openai"},
            headers={"Authorization": f"Bearer {account.jwt}"},
            timeout=30,
        )
        if quota.status_code == 200:
            remaining = quota.json().get("remainingTokens")
            break
        time.sleep(1)
    charged = budget - int(remaining) if remaining is not None else None
    row = exactness_row(responses, budget, charged)
    if not chat:  # /consume answers carry the stub's usage, not the tokens charged
        row["tokens_in_admitted_answers"] = row["admitted"] * tokens_per_request
    row["remaining_after"] = remaining
    return row


# ---------------------------------------------------------------------------------------------
# Report


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    targets = report["targets"]
    lines = [
        f"Measured {report['when']} on {report['machine']['cpu']}, "
        f"{report['machine']['cores']} cores, {report['machine']['memory_gib']} GiB "
        f"({report['machine']['os']})"
        + (
            f"; **shared machine**: other processes used {report['others_cores']:.2f} cores on "
            "average while we measured."
            if report["shared_machine"]
            else "; the machine was otherwise quiet."
        ),
        f"Load generator: {report['load_generator']['tool']}, 1 thread, ceiling "
        f"{report['load_generator']['ceiling_rps']:,} req/s at 32 connections against a "
        "trivial server. Median of "
        f"{report['config']['runs']} interleaved runs of {report['config']['seconds']} s each.",
        "",
        "| target | mode | conns | req/s | p50 ms | p99 ms | CPU-ms/req, system | "
        "CPU-ms/req, stub | CPU-ms/req, PostgreSQL |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in targets.values():
        for mode in MODES:
            if mode not in t:
                continue
            for conns, cell in t[mode]["by_connections"].items():
                by = cell["cpu_ms_per_request_by_process"]
                own = [v for role, v in by.items() if role not in ("stub", "postgresql")]
                flags = ""
                if cell["non2xx"] or cell["timeouts"]:
                    flags = f" ⚠ {cell['non2xx']} non-2xx, {cell['timeouts']} timeouts"
                if few_requests(cell, int(conns)):
                    flags += f" ⚠ only {cell['requests']} requests per run"
                lines.append(
                    f"| {t['label']} | {mode} | {conns} | {cell['rps']:.0f}{flags} | "
                    f"{cell['p50_ms']:.2f} | {cell['p99_ms']:.2f} | "
                    f"{_fmt(own[0] if own else None)} | {_fmt(by.get('stub'))} | "
                    f"{_fmt(by.get('postgresql'))} |"
                )
    lines += [
        "",
        "| target | first chunk p50 / p99 ms (1 conn) | RSS MiB | idle CPU, cores | "
        f"admitted of {BURST} at once | tokens let through / budget |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, t in targets.items():
        ttfc = report["first_chunk"].get(name)
        first = (
            f"{ttfc['first_chunk_p50_ms']:.2f} / {ttfc['first_chunk_p99_ms']:.2f}" if ttfc else "-"
        )
        exact = report["exactness"].get(name)
        admitted = "-"
        if exact:
            admitted = f"{exact['admitted']} (budget covers {report['config']['budget_requests']}"
            others = [
                f"{status}x{count}"
                for status, count in exact["statuses"].items()
                if status not in ("200", "402", "429")
            ]
            admitted += f"; also {', '.join(others)})" if others else ")"
        let_through = "-"
        if exact:
            counted = exact["tokens_charged"]
            if counted is None:
                counted = exact["tokens_in_admitted_answers"]
            let_through = f"{counted} / {exact['budget_tokens']}"
        rss, idle = report["rss_mb"].get(name), report["idle_cores"].get(name)
        lines.append(
            f"| {t['label']} | {first} | {_fmt(rss, 0)} | {_fmt(idle, 3)} | {admitted} | "
            f"{let_through} |"
        )
    lines += [
        "",
        f"Leaky Tokens / LiteLLM (plain, 32 connections): requests/s x {report['rps_ratio']}, "
        f"CPU per request x {report['cpu_ratio']}.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


@dataclass
class Systems:
    """Every process of one comparison, started."""

    stub_pid: int
    stub_url: str
    stub_how: str
    litellm_pid: int
    litellm_url: str
    leakies: list[Leaky]
    tokens_per_request: int  # the stub's usage.total_tokens for the chat body
    budget: int  # the exactness budget: budget_requests x tokens_per_request


def start_systems(
    stack: ExitStack, workdir: Path, shapes: list[str], budget_requests: int
) -> Systems:
    stub_pid, stub_port, stub_how = start_stub(stack, workdir)
    stub_url = f"http://127.0.0.1:{stub_port}"
    probe = httpx.post(f"{stub_url}{CHAT_COMPLETIONS}", json=chat_body(MODEL, False))
    probe.raise_for_status()
    tokens_per_request = int(probe.json()["usage"]["total_tokens"])
    budget = budget_requests * tokens_per_request
    keys = {
        "sk-bench-load": {"tpm_limit": OUT_OF_REACH, "rpm_limit": OUT_OF_REACH},
        "sk-bench-budget": {"tpm_limit": budget},
    }
    litellm_pid, litellm_port = start_litellm(stack, workdir, stub_port, keys)
    leakies = [start_leaky(stack, workdir, shape, stub_port) for shape in shapes]
    return Systems(
        stub_pid,
        stub_url,
        stub_how,
        litellm_pid,
        f"http://127.0.0.1:{litellm_port}{CHAT_COMPLETIONS}",
        leakies,
        tokens_per_request,
        budget,
    )


def build_targets(systems: Systems, chat: bool) -> list[Target]:
    def stub_role() -> list[int]:
        return [systems.stub_pid]

    def tree_of(pid: int) -> Callable[[], list[int]]:
        return lambda: procstat.tree(pid)

    chat_bodies = {m: chat_body(MODEL, m == "streamed") for m in MODES}
    targets = [
        Target(
            "stub",
            "stub alone (/v1/chat/completions)",
            f"{systems.stub_url}{CHAT_COMPLETIONS}",
            {},
            chat_bodies,
            "",
            {"stub": stub_role},
        ),
        Target(
            "litellm",
            f"LiteLLM {venv.LITELLM} proxy, 1 worker",
            systems.litellm_url,
            {"Authorization": "Bearer sk-bench-load"},
            chat_bodies,
            "litellm",
            {"litellm": tree_of(systems.litellm_pid), "stub": stub_role},
        ),
    ]
    if not chat:  # the stub route /consume calls, for its added latency
        targets.insert(
            1,
            Target(
                "stub_consume_path",
                "stub alone (/api/v1/openai/chat)",
                f"{systems.stub_url}/api/v1/openai/chat",
                {},
                {"plain": {"prompt": PROMPT, "userId": str(uuid.uuid4())}},
                "",
                {"stub": stub_role},
            ),
        )
    for leaky in systems.leakies:
        account = leaky_account(leaky, 10**12)
        url, headers, bodies = leaky_request(leaky, account, chat, systems.tokens_per_request)
        roles: dict[str, Callable[[], Iterable[int]]] = {
            "leaky-tokens": tree_of(leaky.pid),
            "stub": stub_role,
        }
        if leaky.databases:
            roles["postgresql"] = postgres_backends(leaky.databases)
        path = CHAT_COMPLETIONS if chat else "/api/v1/tokens/consume"
        label = f"Leaky Tokens {leaky.shape} (gateway → {path})"
        targets.append(
            Target(f"leaky_{leaky.shape}", label, url, headers, bodies, "leaky-tokens", roles)
        )
    for target in targets:  # every target answers before anything is measured
        for mode, body in target.bodies.items():
            answer = httpx.post(target.url, headers=target.headers, json=body, timeout=30)
            if answer.status_code != 200:
                raise RuntimeError(f"{target.label} {mode}: {answer.status_code} {answer.text}")
    return targets


def exactness_all(systems: Systems, chat: bool, budget_requests: int) -> dict[str, Any]:
    litellm = asyncio.run(
        burst(
            systems.litellm_url,
            {"Authorization": "Bearer sk-bench-budget"},
            chat_body(MODEL, False),
        )
    )
    rows = {"litellm": exactness_row(litellm, systems.budget, None)}
    for leaky in systems.leakies:
        rows[f"leaky_{leaky.shape}"] = leaky_exactness(
            leaky, chat, systems.tokens_per_request, budget_requests
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs per cell; the median counts")
    parser.add_argument("--seconds", type=int, default=4, help="seconds per run")
    parser.add_argument("--budget-requests", type=int, default=100)
    parser.add_argument("--first-chunk-requests", type=int, default=200)
    parser.add_argument("--no-distributed", action="store_true")
    args = parser.parse_args()
    if not venv.bin_path("litellm").exists():
        sys.exit("LiteLLM's proxy is not installed: run `make bench-compare`")
    if not wrk.available():
        sys.exit("wrk is not installed: run `make bench-compare` (it installs wrk)")
    started = time.monotonic()
    when = datetime.now(UTC).isoformat(timespec="seconds")
    load_generator = ceiling.measure()
    print(f"load generator: {load_generator['tool']}, {load_generator['ceiling_rps']} req/s max")
    shapes = ["embedded"]
    if not args.no_distributed and bench_gateway.servers_answer():
        shapes.append("distributed")

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        systems = start_systems(stack, Path(tmp), shapes, args.budget_requests)
        chat = leaky_offers_chat(systems.leakies[0])
        targets = build_targets(systems, chat)
        idle = idle_cores(targets)
        print(f"idle CPU, cores: {idle}")
        others = Others()
        loadavg_before = os.getloadavg()
        cells = measure_cells(targets, args.runs, args.seconds, others)
        first_chunk = first_chunks(targets, args.first_chunk_requests)
        exactness = exactness_all(systems, chat, args.budget_requests)
        rss = {t.name: round(procstat.rss_mb(_own_pids(t)), 1) for t in targets}

    summary = summarise(cells, targets)
    lt, ll = summary["leaky_embedded"]["plain"], summary["litellm"]["plain"]
    report: dict[str, Any] = {
        "when": when,
        "machine": machine(),
        "loadavg_before": [round(x, 2) for x in loadavg_before],
        "others_cores": round(others.cores, 2),
        "shared_machine": others.cores > 0.2,
        "load_generator": load_generator,
        "leaky_target": "chat" if chat else "consume",
        "stub": systems.stub_how,
        "litellm": {
            "version": venv.LITELLM,
            "workers": 1,
            "enforces": "per-key tpm_limit/rpm_limit from a custom auth hook, in-memory "
            "(parallel_request_limiter_v3: reserve an estimate, reconcile to the reported "
            "usage); no database, no Redis",
        },
        "config": {
            "runs": args.runs,
            "seconds": args.seconds,
            "connections": list(CONNECTIONS),
            "budget_requests": args.budget_requests,
            "tokens_per_request": systems.tokens_per_request,
            "request": chat_body(MODEL, False),
        },
        "targets": summary,
        "first_chunk": first_chunk,
        "exactness": exactness,
        "rss_mb": rss,
        "idle_cores": idle,
        "rps_ratio": ratio(lt["rps"], ll["rps"]),
        "cpu_ratio": ratio(lt["cpu_ms_per_request"], ll["cpu_ms_per_request"]),
        "elapsed_s": round(time.monotonic() - started),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (RESULTS / "compare.md").write_text(table)
    print("\n" + table)
    print(f"written to {RESULTS / 'compare.json'} and compare.md in {report['elapsed_s']} s")


def _own_pids(target: Target) -> list[int]:
    """The target's own processes (the stub's for the stub alone)."""
    role = target.serving or "stub"
    return list(target.roles[role]())


if __name__ == "__main__":
    main()
