"""Logging in while the login throttle's Redis is black-holed or stopped (issue 9, defect 7:
login answered 500 while Redis was down, and once more after it came back). Over a real socket;
Redis through tests/redis_proxy.py so the shared test Redis is never stopped."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from leaky_tokens.auth.app import create_auth_app
from leaky_tokens.settings import Settings
from tests.live_server import serving
from tests.polling import eventually
from tests.redis_proxy import RedisProxy, assert_no_stall, redis_proxy

TIMEOUT = 0.5
ERROR_KEYS = {"message", "timestamp", "code", "requestId"}


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[RedisProxy]:
    async with redis_proxy(redis_url) as running:
        yield running


async def timed_login(http: httpx.AsyncClient, username: str) -> tuple[float, httpx.Response]:
    started = time.monotonic()
    response = await http.post(
        "/api/v1/auth/login", json={"username": username, "password": "correct-horse-1"}
    )
    return time.monotonic() - started, response


@pytest.mark.parametrize(
    ("outage", "on_failure"),
    [
        ("black hole", "fallback"),
        ("down", "fallback"),
        ("down", "closed"),
        ("black hole", "closed"),
    ],
)
async def test_login_during_a_redis_outage_is_200_or_503_in_our_shape_and_heals(
    proxy: RedisProxy, tmp_path: Path, outage: str, on_failure: str
) -> None:
    settings = Settings(
        data_dir=tmp_path / "var",
        access_log=False,
        redis_url=proxy.url,
        redis={
            "connect_timeout_seconds": TIMEOUT,
            "command_timeout_seconds": TIMEOUT,
            "fail_fast_seconds": 0.5,
            "on_failure": on_failure,
        },
        auth={
            "database_url": f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}",
            "argon2_time_cost": 1,
            "argon2_memory_kib": 1024,
        },
    )
    app = create_auth_app(settings)
    username = f"user_{uuid.uuid4().hex[:10]}"
    async with (
        serving(app, lifespan=True) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        registered = await http.post(
            "/api/v1/auth/register",
            json={
                "username": username,
                "email": f"{username}@example.com",
                "password": "correct-horse-1",
            },
        )
        assert registered.status_code == 201, registered.text
        _, before = await timed_login(http, username)
        assert before.status_code == 200, before.text

        await proxy.set(outage)  # type: ignore[arg-type]
        during = await asyncio.gather(*(timed_login(http, username) for _ in range(6)))
        during += [await timed_login(http, username) for _ in range(12)]
        await proxy.set("up")

        async def logs_in_again() -> bool:
            _, response = await timed_login(http, username)
            assert response.status_code in (200, 503), response.text  # never a 500
            return response.status_code == 200

        await eventually(logs_in_again, within=20, what="login through Redis again")
        after = [await timed_login(http, username) for _ in range(3)]

    assert_no_stall([seconds for seconds, _ in during], TIMEOUT)
    for _, response in during:
        if on_failure == "fallback":
            assert response.status_code == 200, response.text
        else:
            assert response.status_code == 503, response.text
            body = response.json()
            assert body.keys() >= ERROR_KEYS
            assert body["code"] == "REDIS_UNAVAILABLE"
            assert response.headers["x-service-outage"] == "true"
    assert [r.status_code for _, r in after] == [200, 200, 200]
