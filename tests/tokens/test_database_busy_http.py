"""Issue 9, defect 3, over a real socket: another process holding the token database's write lock
(as `leaky-tokens admin set-quota` did against a running `up`) froze every service of the process
for 6.9 s, because the write waited for the lock on the event loop. Now the waiting write leaves
the loop free, and a lock held past the busy timeout is a 503 DATABASE_BUSY marked as an outage
(so the gateway's breaker counts it)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from leaky_tokens.settings import Settings
from leaky_tokens.shared.database import SQLITE_BUSY_SECONDS
from leaky_tokens.shared.events import INTERNAL_TOKEN_HEADER
from leaky_tokens.tokens.app import create_tokens_app
from tests.gateway.gateway_harness import FakeAuthenticator
from tests.live_server import serving

TOKEN = "busy-test-internal-token"


@contextlib.asynccontextmanager
async def token_service(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Path]]:
    settings = Settings(access_log=False, data_dir=tmp_path / "var", internal_token=TOKEN)
    app = create_tokens_app(settings, authenticator=FakeAuthenticator())
    async with (
        serving(app, lifespan=True) as url,
        httpx.AsyncClient(base_url=url, timeout=60) as http,
    ):
        yield http, settings.data_dir / "tokens.db"


def set_quota(http: httpx.AsyncClient) -> asyncio.Task[httpx.Response]:
    return asyncio.create_task(
        http.put(
            "/internal/quota",
            headers={INTERNAL_TOKEN_HEADER: TOKEN},
            json={"userId": str(uuid.uuid4()), "provider": "openai", "totalTokens": 100},
        )
    )


async def test_a_write_waiting_for_another_process_leaves_the_service_answering(
    tmp_path: Path,
) -> None:
    async with token_service(tmp_path) as (http, path):
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            write = set_quota(http)
            await asyncio.sleep(0.2)  # (let the write reach the lock; it must be waiting)
            status = await asyncio.wait_for(http.get("/api/v1/tokens/status"), 10)
            assert not write.done()
            other.execute("COMMIT")
            written = await asyncio.wait_for(write, 30)
        finally:
            other.close()

    assert status.status_code == 200, status.text
    assert written.status_code == 200, written.text


async def test_a_lock_held_past_the_busy_timeout_is_a_marked_503(tmp_path: Path) -> None:
    async with token_service(tmp_path) as (http, path):
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            refused = await asyncio.wait_for(set_quota(http), SQLITE_BUSY_SECONDS + 30)
        finally:
            other.execute("ROLLBACK")
            other.close()
        after = await set_quota(http)

    assert refused.status_code == 503, refused.text
    assert refused.json()["code"] == "DATABASE_BUSY"
    assert refused.headers["x-service-outage"] == "true"
    assert refused.headers["retry-after"] == "1"
    assert after.status_code == 200, after.text
