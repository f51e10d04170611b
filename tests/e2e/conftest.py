"""Real processes over real HTTP: `leaky-tokens up` (or `serve`) started on free ports.

Each stack runs in one of two shapes: "embedded" (SQLite files, in-memory limits) and
"distributed" (fresh PostgreSQL databases per service, Redis); the second is skipped with a
reason when those servers don't answer (and fails instead under LEAKY_TEST_REQUIRE_SERVERS=1).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.backends import (
    REDIS_URL,
    create_postgres_database,
    drop_postgres_database,
    need_postgres,
    need_redis,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("gateway", "auth", "tokens", "analytics", "qwen", "gemini", "openai")
TABLE_OWNERS = ("auth", "tokens", "analytics")


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Process:
    """One leaky-tokens process; knows its ports once it has written its ready file."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        workdir: Path,
        name: str,
        module: str = "leaky_tokens.cli",
    ) -> None:
        """`module` is what `python -m` runs: the CLI, or a test launcher wrapping it."""
        self.args, self.env, self.workdir, self.name = args, env, workdir, name
        self.module = module
        self.ready_file = workdir / f"{name}.ready.json"
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}

    def start(self, timeout: float = 60.0) -> Process:
        self.ready_file.unlink(missing_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                self.module,
                *self.args,
                "--ready-file",
                str(self.ready_file),
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} not ready in {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)
        self.ports = json.loads(self.ready_file.read_text())["ports"]
        return self

    def log_tail(self, lines: int = 12) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class Stack:
    """A running system: one or more processes, and how to reach each service."""

    def __init__(self, workdir: Path, env: dict[str, str], shape: str) -> None:
        self.workdir, self.env, self.shape = workdir, env, shape
        self.processes: list[Process] = []

    def up(self, *args: str, name: str = "up", extra_env: dict[str, str] | None = None) -> Process:
        env = {**self.env, **(extra_env or {})}
        process = Process(["up", *args], env, self.workdir, name).start()
        self.processes.append(process)
        return process

    def serve(self, service: str, port: int, name: str | None = None) -> Process:
        process = Process(
            ["serve", service, "--port", str(port)], self.env, self.workdir, name or service
        ).start()
        self.processes.append(process)
        return process

    def url(self, service: str) -> str:
        for process in reversed(self.processes):
            if process.proc and process.proc.poll() is None and service in process.ports:
                return f"http://127.0.0.1:{process.ports[service]}"
        raise LookupError(f"{service} is not running")

    def client(self, service: str, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url(service), timeout=30.0, **kwargs)  # type: ignore[arg-type]

    def internal_token(self) -> str:
        """The token of internal endpoints, made by the first process in the data directory."""
        return (self.workdir / "var" / "internal_token").read_text().strip()

    def stop_all(self) -> None:
        for process in self.processes:
            process.stop()


def base_env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAKY_") and k != "REDIS_URL"}
    env.update(
        {
            "LEAKY_DATA_DIR": str(workdir / "var"),
            "LEAKY_ACCESS_LOG": "false",
            "LEAKY_AUTH__ARGON2_TIME_COST": "1",
            "LEAKY_AUTH__ARGON2_MEMORY_KIB": "1024",
            "PYTHONUNBUFFERED": "1",
        }
    )
    for service in SERVICES:
        env[f"LEAKY_PORTS__{service.upper()}"] = "0"
    return env


@pytest.fixture(scope="module", params=["embedded", "distributed"])
def stack_env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, dict[str, str], str]]:
    """Environment for a stack of the given shape (databases made fresh for the module)."""
    workdir = tmp_path_factory.mktemp(f"stack-{request.param}")
    env = base_env(workdir)
    databases: list[str] = []
    if request.param == "distributed":
        need_postgres()
        need_redis()
        for service in TABLE_OWNERS:
            url = asyncio.run(create_postgres_database(service))
            databases.append(url)
            env[f"LEAKY_{service.upper()}__DATABASE_URL"] = url
        env["REDIS_URL"] = REDIS_URL
        # Each stack its own event streams: analytics consumers of other stacks (same group
        # name) would otherwise take this stack's events.
        env["LEAKY_EVENTS__STREAM_PREFIX"] = f"lt:test:events:{uuid.uuid4().hex}:"
        # ... and its own limiter windows: they outlive a run in Redis, and every stack's
        # clients come from 127.0.0.1 (registration conflicts of earlier runs throttled later
        # runs' registrations).
        env["LEAKY_AUTH__THROTTLE_KEY_PREFIX"] = f"lt:test:auth:{uuid.uuid4().hex}:"
        env["LEAKY_GATEWAY__RATE_LIMIT_KEY_PREFIX"] = f"lt:test:gw:{uuid.uuid4().hex}:"
    try:
        yield workdir, env, request.param
    finally:
        for url in databases:
            asyncio.run(drop_postgres_database(url))


@pytest.fixture(scope="module")
def stack(stack_env: tuple[Path, dict[str, str], str]) -> Iterator[Stack]:
    """The whole system in one process (`leaky-tokens up`), shared by a test module."""
    workdir, env, shape = stack_env
    running = Stack(workdir, env, shape)
    running.up()
    try:
        yield running
    finally:
        running.stop_all()


# Modules that start their own system (with an ADMIN, special limits…) define a module-scoped
# `system` fixture; these clients and accounts are then built on it.


@pytest.fixture(scope="module")
def auth(system: Stack) -> Iterator[httpx.Client]:
    with system.client("auth") as client:
        yield client


@pytest.fixture(scope="module")
def tokens(system: Stack) -> Iterator[httpx.Client]:
    with system.client("tokens") as client:
        yield client
