"""GET /api/v1/tokens/quotas at service level (the dashboard's quota view) and the ADMIN-only
outbox backlog, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid

import pytest

from leaky_tokens.shared.errors import Forbidden
from leaky_tokens.shared.pagination import PageRequest
from leaky_tokens.tokens.service import ORG_POOL, USER_POOL
from tests.tokens.conftest import Rig, admin, user

PAGE = PageRequest(1, 100)


async def _pool(rig: Rig, kind: str, owner: uuid.UUID, provider: str, total: int) -> None:
    await rig.service.put_quota(kind, owner, provider, total=total, remaining=None, reset_at=None)


def _owners(views: list) -> list[tuple[str, uuid.UUID, str]]:
    return [(v.kind, v.owner_id, v.provider) for v in views]


async def test_a_user_lists_their_pools_and_their_orgs_pools_only(rig: Rig) -> None:
    alice, bob, org, other_org = (uuid.uuid4() for _ in range(4))
    await _pool(rig, USER_POOL, alice, "openai", 100)
    await _pool(rig, USER_POOL, alice, "qwen", 200)
    await _pool(rig, ORG_POOL, org, "openai", 1000)
    await _pool(rig, USER_POOL, bob, "openai", 5)
    await _pool(rig, ORG_POOL, other_org, "openai", 7)

    views, total = await rig.service.list_quotas(user(alice, org), PAGE)
    assert total == 3
    # users' pools first, then organisations'; by owner, then provider
    assert _owners(views) == [
        (USER_POOL, alice, "openai"),
        (USER_POOL, alice, "qwen"),
        (ORG_POOL, org, "openai"),
    ]
    assert (views[0].total_tokens, views[0].remaining_tokens) == (100, 100)
    only_org, _ = await rig.service.list_quotas(user(alice, org), PAGE, org_id=org)
    assert _owners(only_org) == [(ORG_POOL, org, "openai")]
    with pytest.raises(Forbidden):
        await rig.service.list_quotas(user(alice, org), PAGE, user_id=bob)
    with pytest.raises(Forbidden):
        await rig.service.list_quotas(user(alice, org), PAGE, org_id=other_org)


async def test_an_admin_pages_through_every_pool_or_picks_an_owner(rig: Rig) -> None:
    owners = [uuid.uuid4() for _ in range(5)]
    for owner in owners:
        await _pool(rig, USER_POOL, owner, "openai", 10)
    org = uuid.uuid4()
    await _pool(rig, ORG_POOL, org, "gemini", 10)
    first, total = await rig.service.list_quotas(admin(), PageRequest(1, 4))
    second, _ = await rig.service.list_quotas(admin(), PageRequest(2, 4))
    assert total == 6
    assert len(first) == 4
    assert len(second) == 2
    assert {v.owner_id for v in first + second} == {*owners, org}
    picked, total = await rig.service.list_quotas(admin(), PAGE, user_id=owners[2], org_id=org)
    assert total == 2
    assert _owners(picked) == [(USER_POOL, owners[2], "openai"), (ORG_POOL, org, "gemini")]


async def test_an_empty_listing_has_no_pools(rig: Rig) -> None:
    assert await rig.service.list_quotas(user(uuid.uuid4()), PAGE) == ([], 0)


async def test_the_outbox_backlog_is_for_admins(rig: Rig) -> None:
    with pytest.raises(Forbidden):
        await rig.service.outbox_backlog(user(uuid.uuid4()))
    backlog = await rig.service.outbox_backlog(admin())
    assert (backlog.unpublished, backlog.oldest_created_at) == (0, None)
