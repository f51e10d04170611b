"""The analytics service in-process, one per test, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.analytics.analytics_harness import AnalyticsClient, running_analytics


@pytest.fixture
async def analytics(database_url: str, tmp_path: Path) -> AsyncIterator[AnalyticsClient]:
    async with running_analytics(database_url, tmp_path) as client:
        yield client
