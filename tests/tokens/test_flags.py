"""Feature flags: settings seed a flag only when it was never set; the admin API's value then
stands on every replica and across restarts; every value says where it came from (SQLite and
PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from leaky_tokens.shared.clock import FakeClock
from leaky_tokens.shared.database import Database
from leaky_tokens.shared.migrations import upgrade_database
from leaky_tokens.tokens.errors import UnknownFlag
from leaky_tokens.tokens.flags import FeatureFlags


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    await upgrade_database(database_url, "tokens")
    database = Database(database_url)
    try:
        yield database
    finally:
        await database.dispose()


def replica(db: Database, clock: FakeClock | None = None, cache: float = 0) -> FeatureFlags:
    """The flags of one token-service process (a restart is a new one)."""
    return FeatureFlags(db, clock or FakeClock(), cache_seconds=cache)


async def test_settings_seed_a_flag_never_set(db: Database) -> None:
    flags = replica(db)
    await flags.seed({"saga.simulate-failure": True})

    states = await flags.states()
    assert states["saga.simulate-failure"].enabled is True
    assert states["saga.simulate-failure"].source == "settings"
    assert states["saga.simulate-failure"].updated_at is not None
    assert states["payment.decline"].source == "default"
    assert states["payment.decline"].updated_at is None


async def test_an_admin_change_survives_a_restart_with_conflicting_settings(db: Database) -> None:
    first = replica(db)
    await first.seed({"saga.simulate-failure": False})
    await first.set("saga.simulate-failure", True)  # the admin API

    restarted = replica(db)
    await restarted.seed({"saga.simulate-failure": False})

    state = (await restarted.states())["saga.simulate-failure"]
    assert (state.enabled, state.source) == (True, "admin")
    assert await restarted.enabled("saga.simulate-failure") is True


async def test_a_seeded_value_is_not_reseeded_by_other_settings(db: Database) -> None:
    await replica(db).seed({"payment.decline": True})
    # another replica starts with other settings: the first value stands on both
    other = replica(db)
    await other.seed({"payment.decline": False})
    assert (await other.states())["payment.decline"].enabled is True


async def test_every_replica_sees_an_admin_change_within_its_cache_time(db: Database) -> None:
    clock = FakeClock()
    reader = replica(db, clock, cache=1.0)
    assert await reader.enabled("saga.purchases-enabled") is True

    await replica(db).set("saga.purchases-enabled", False)

    clock.advance(1.01)
    assert await reader.enabled("saga.purchases-enabled") is False


async def test_unknown_flags_are_refused_from_settings_and_the_api(db: Database) -> None:
    with pytest.raises(UnknownFlag):
        await replica(db).seed({"saga.no-such": True})
    with pytest.raises(UnknownFlag):
        await replica(db).set("saga.no-such", True)
