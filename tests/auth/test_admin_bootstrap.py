"""The ADMIN named in the settings (admin_username / admin_password), made at start-up."""

from __future__ import annotations

import pytest

from tests.auth.auth_harness import PASSWORD, StartAuth, unique

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_the_configured_admin_exists_once_across_restarts(start_auth: StartAuth) -> None:
    admin = (unique("ops"), "ops-password-1")
    async with start_auth(admin=admin) as auth:
        first = await auth.log_in(*admin)
    async with start_auth(admin=admin) as auth:
        again = await auth.log_in(*admin)

    assert first.roles == again.roles == ["USER", "ADMIN"]
    assert first.user_id == again.user_id


async def test_an_account_that_took_the_admin_username_first_is_not_promoted(
    start_auth: StartAuth,
) -> None:
    name = unique("ops")
    async with start_auth() as auth:
        squatter = await auth.register(name)  # before the operator configured the name

    async with start_auth(admin=(name, "operators-secret-1")) as auth:
        again = await auth.log_in(name, PASSWORD)
        me = await auth.me(again.headers)

    assert squatter.roles == ["USER"]
    assert again.roles == ["USER"]
    assert me.json()["roles"] == ["USER"]


async def test_an_existing_account_is_promoted_when_the_configured_password_is_its_own(
    start_auth: StartAuth,
) -> None:
    name = unique("ops")
    async with start_auth() as auth:
        await auth.register(name)

    async with start_auth(admin=(name, PASSWORD)) as auth:
        again = await auth.log_in(name, PASSWORD)

    assert again.roles == ["USER", "ADMIN"]
