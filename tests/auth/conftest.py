"""The auth service in-process on real databases: every test runs on SQLite and PostgreSQL.

`auth` is one service per module and backend (tests there use their own users, so they don't
meet); `start_auth` starts services on a fresh database of the test's own, for tests that need
other settings, a fake clock, a restart or a second replica.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.auth.auth_harness import AuthClient, StartAuth, fresh_database, running_auth


@pytest.fixture
def start_auth(database_url: str, tmp_path: Path) -> StartAuth:
    return functools.partial(running_auth, database_url, tmp_path)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["sqlite", "postgresql"])
async def auth(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AuthClient]:
    directory = tmp_path_factory.mktemp("auth")
    # Many tests share this service's one client address; only throttling tests count attempts
    # (and registration conflicts).
    async with (
        fresh_database(request.param, directory) as url,
        running_auth(
            url,
            directory,
            login_max_attempts_per_client=10_000,
            registration_conflicts_per_client=10_000,
        ) as client,
    ):
        yield client
