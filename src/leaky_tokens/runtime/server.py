"""Runs one or several services in one process, each on its own port, on one event loop.

Every socket is bound before any service starts, so a port in use fails fast with a clear
message, and a port of 0 gets a free one that the other services then know about.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
from collections.abc import Generator, Iterable
from pathlib import Path

import uvicorn

from leaky_tokens.runtime.compose import build_app
from leaky_tokens.settings import Settings

log = logging.getLogger("leaky_tokens.runtime")


class StartupError(Exception):
    """The system cannot start; the message says why in plain words."""


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # One handler for the whole process stops every server (see serve_services).
        yield


def bind_socket(host: str, port: int, service: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"port {port} for {service} is already in use on {host}; stop what holds it "
                f"or set LEAKY_PORTS__{service.upper()} to another port"
            ) from exc
        raise StartupError(f"cannot listen on {host}:{port} for {service}: {exc}") from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def bind_all(settings: Settings, services: Iterable[str]) -> dict[str, socket.socket]:
    bound: dict[str, socket.socket] = {}
    try:
        for service in services:
            bound[service] = bind_socket(settings.host, getattr(settings.ports, service), service)
    except StartupError:
        for sock in bound.values():
            sock.close()
        raise
    return bound


async def serve_services(
    settings: Settings, services: list[str], *, ready_file: Path | None = None
) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code."""
    sockets = bind_all(settings, services)
    actual = {name: sock.getsockname()[1] for name, sock in sockets.items()}
    settings = settings.with_ports(actual)
    servers: dict[str, uvicorn.Server] = {}
    for name in services:
        config = uvicorn.Config(
            build_app(name, settings),
            http="httptools",
            loop="none",
            lifespan="on",
            log_config=None,
            access_log=False,
            server_header=False,
            # uvicorn would believe X-Forwarded-For from any loopback peer; our services decide
            # themselves whose to believe (`trusted_proxies`), from the real peer address.
            proxy_headers=False,
            timeout_graceful_shutdown=5,
            timeout_keep_alive=30,
        )
        servers[name] = _EmbeddedServer(config)

    def stop(*_: object) -> None:
        for server in servers.values():
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)

    tasks = {
        name: asyncio.create_task(server.serve(sockets=[sockets[name]]), name=f"serve-{name}")
        for name, server in servers.items()
    }
    exit_code = 0
    try:
        while not all(s.started for s in servers.values()):
            done = [t for t in tasks.values() if t.done()]
            if done:
                raise StartupError("a service failed to start; see the log above")
            await asyncio.sleep(0.02)
        log.info(
            "leaky-tokens is up",
            extra={"ports": actual, "pid": os.getpid()},
        )
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), "ports": actual}))
            tmp.replace(ready_file)
        await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
        if not all(s.should_exit for s in servers.values()):
            exit_code = 1
            log.error("a service stopped unexpectedly; stopping the others")
    except StartupError as exc:
        log.error(str(exc))
        exit_code = 3
    finally:
        stop()
        results = await asyncio.gather(*tasks.values(), return_exceptions=True)
        for name, result in zip(tasks, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                exit_code = exit_code or 3
                if not isinstance(result, SystemExit):
                    log.error("service %s failed: %r", name, result)
        for sock in sockets.values():
            sock.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return exit_code
