"""Organisations: creation, listing, membership changes and who may make them."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest

from tests.auth.auth_harness import Account, AuthClient, assert_error

pytestmark = pytest.mark.asyncio(loop_scope="module")

ORGS = "/api/v1/auth/orgs"


async def _create_org(auth: AuthClient, owner: Account, name: str = "Acme") -> dict[str, Any]:
    response = await auth.http.post(ORGS, json={"name": name}, headers=owner.headers)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def _add(auth: AuthClient, org_id: str, user_id: str, by: Account) -> Any:
    return await auth.http.post(
        f"{ORGS}/{org_id}/members", json={"userId": user_id}, headers=by.headers
    )


async def _remove(auth: AuthClient, org_id: str, user_id: str, by: Account) -> Any:
    return await auth.http.delete(f"{ORGS}/{org_id}/members/{user_id}", headers=by.headers)


async def test_creating_an_organisation_answers_201_with_the_caller_as_owner(
    auth: AuthClient,
) -> None:
    owner = await auth.register()

    response = await auth.http.post(ORGS, json={"name": "Acme"}, headers=owner.headers)

    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"orgId", "name", "ownerId", "createdAt", "role"}
    assert uuid.UUID(body["orgId"])
    assert body["name"] == "Acme"
    assert body["ownerId"] == owner.user_id
    assert body["role"] == "OWNER"
    created = datetime.fromisoformat(body["createdAt"].replace("Z", "+00:00"))
    assert abs(created - datetime.now(UTC)) < timedelta(minutes=1)


async def test_an_organisation_needs_a_name_and_a_caller(auth: AuthClient) -> None:
    owner = await auth.register()

    for body in ({}, {"name": ""}, {"name": "   "}, {"name": "x" * 101}):
        response = await auth.http.post(ORGS, json=body, headers=owner.headers)
        details = assert_error(response, 400, "INVALID_REQUEST")["details"]
        assert [d["field"] for d in details] == ["name"], body
    assert_error(await auth.http.post(ORGS, json={"name": "Acme"}), 401, "AUTH_INVALID_KEY")


async def test_the_list_shows_only_my_organisations_paged(auth: AuthClient) -> None:
    me, stranger = await auth.register(), await auth.register()
    mine = [(await _create_org(auth, me, f"org-{i}"))["orgId"] for i in range(3)]
    await _create_org(auth, stranger, "not-mine")

    first = await auth.http.get(ORGS, params={"page_size": 2}, headers=me.headers)
    second = await auth.http.get(ORGS, params={"page_size": 2, "page": 2}, headers=me.headers)

    assert first.status_code == 200, first.text
    assert first.json()["pagination"] == {"page": 1, "page_size": 2, "total": 3, "total_pages": 2}
    listed = first.json()["items"] + second.json()["items"]
    assert sorted(o["orgId"] for o in listed) == sorted(mine)
    assert {o["role"] for o in listed} == {"OWNER"}
    assert "not-mine" not in first.text + second.text


async def test_a_member_sees_the_organisation_in_their_list(auth: AuthClient) -> None:
    owner, member = await auth.register(), await auth.register()
    org = await _create_org(auth, owner)
    assert (await _add(auth, org["orgId"], member.user_id, owner)).status_code == 201

    response = await auth.http.get(ORGS, headers=member.headers)

    [item] = response.json()["items"]
    assert item["orgId"] == org["orgId"]
    assert item["ownerId"] == owner.user_id
    assert item["role"] == "MEMBER"


async def test_the_owner_adds_a_member(auth: AuthClient) -> None:
    owner, member = await auth.register(), await auth.register()
    org = await _create_org(auth, owner)

    response = await _add(auth, org["orgId"], member.user_id, owner)

    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"orgId", "userId", "role", "createdAt"}
    assert (body["orgId"], body["userId"], body["role"]) == (
        org["orgId"],
        member.user_id,
        "MEMBER",
    )


async def test_a_member_who_logs_in_afterwards_carries_the_org(auth: AuthClient) -> None:
    owner, member = await auth.register(), await auth.register()
    org = await _create_org(auth, owner)
    key = await auth.create_api_key(member)
    await _add(auth, org["orgId"], member.user_id, owner)

    again = await auth.log_in(member.username, member.password)

    claims = jwt.decode(again.token, options={"verify_signature": False})
    assert claims["orgs"] == [org["orgId"]]
    assert (await auth.me(again.headers)).json()["orgIds"] == [org["orgId"]]
    validated = await auth.http.get(
        "/api/v1/auth/api-keys/validate", headers={"X-Api-Key": key["rawKey"]}
    )
    assert validated.json()["orgIds"] == [org["orgId"]]
    assert (await auth.me({"X-Api-Key": key["rawKey"]})).json()["orgIds"] == [org["orgId"]]


async def test_a_token_issued_before_joining_does_not_carry_the_org(auth: AuthClient) -> None:
    owner, member = await auth.register(), await auth.register()
    org = await _create_org(auth, owner)
    await _add(auth, org["orgId"], member.user_id, owner)

    assert (await auth.me(member.headers)).json()["orgIds"] == []


async def test_the_owners_token_carries_the_org_after_logging_in(auth: AuthClient) -> None:
    owner = await auth.register()
    org = await _create_org(auth, owner)

    again = await auth.log_in(owner.username, owner.password)

    assert (await auth.me(again.headers)).json()["orgIds"] == [org["orgId"]]


async def test_a_plain_member_may_not_change_membership(auth: AuthClient) -> None:
    owner, member, newcomer = [await auth.register() for _ in range(3)]
    org = await _create_org(auth, owner)
    await _add(auth, org["orgId"], member.user_id, owner)

    added = await _add(auth, org["orgId"], newcomer.user_id, member)
    removed = await _remove(auth, org["orgId"], owner.user_id, member)

    assert_error(added, 403, "FORBIDDEN")
    assert_error(removed, 403, "FORBIDDEN")
    listed = await auth.http.get(ORGS, headers=newcomer.headers)
    assert listed.json()["pagination"]["total"] == 0


async def test_an_outsider_cannot_tell_the_organisation_exists(auth: AuthClient) -> None:
    owner, member, outsider = [await auth.register() for _ in range(3)]
    org = await _create_org(auth, owner)
    await _add(auth, org["orgId"], member.user_id, owner)

    added = await _add(auth, org["orgId"], outsider.user_id, outsider)
    removed = await _remove(auth, org["orgId"], member.user_id, outsider)
    unknown = await _add(auth, str(uuid.uuid4()), outsider.user_id, outsider)

    for response in (added, removed, unknown):
        body = assert_error(response, 404, "ORG_NOT_FOUND")
        assert body["message"] == "organisation not found"
    assert "Acme" not in added.text


async def test_adding_a_member_twice_is_a_conflict(auth: AuthClient) -> None:
    owner, member = await auth.register(), await auth.register()
    org = await _create_org(auth, owner)
    await _add(auth, org["orgId"], member.user_id, owner)

    again = await _add(auth, org["orgId"], member.user_id, owner)
    owner_again = await _add(auth, org["orgId"], owner.user_id, owner)

    assert_error(again, 409, "ALREADY_MEMBER")
    assert_error(owner_again, 409, "ALREADY_MEMBER")


async def test_concurrent_adds_of_one_member_add_exactly_one(auth: AuthClient) -> None:
    owner, member = await auth.register(), await auth.register()
    org = await _create_org(auth, owner)

    responses = await asyncio.gather(
        *(_add(auth, org["orgId"], member.user_id, owner) for _ in range(10))
    )

    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * 9
    assert {r.json()["code"] for r in responses if r.status_code == 409} == {"ALREADY_MEMBER"}


async def test_adding_an_unknown_user_is_404(auth: AuthClient) -> None:
    owner = await auth.register()
    org = await _create_org(auth, owner)

    response = await _add(auth, org["orgId"], str(uuid.uuid4()), owner)

    assert_error(response, 404, "USER_NOT_FOUND")


async def test_the_owner_cannot_be_removed(auth: AuthClient) -> None:
    owner = await auth.register()
    admin = await auth.admin()
    org = await _create_org(auth, owner)

    by_owner = await _remove(auth, org["orgId"], owner.user_id, owner)
    by_admin = await _remove(auth, org["orgId"], owner.user_id, admin)

    assert_error(by_owner, 400, "CANNOT_REMOVE_OWNER")
    assert_error(by_admin, 400, "CANNOT_REMOVE_OWNER")


async def test_removing_a_member_answers_204_and_ends_their_membership(auth: AuthClient) -> None:
    owner, member = await auth.register(), await auth.register()
    org = await _create_org(auth, owner)
    await _add(auth, org["orgId"], member.user_id, owner)

    response = await _remove(auth, org["orgId"], member.user_id, owner)

    assert response.status_code == 204, response.text
    assert response.content == b""
    again = await auth.log_in(member.username, member.password)
    assert (await auth.me(again.headers)).json()["orgIds"] == []
    assert (await auth.http.get(ORGS, headers=again.headers)).json()["items"] == []
    # The token they held still names the org: refused from now on (see test_principal_changes)
    assert_error(await auth.me(member.headers), 401, "AUTH_REVOKED_TOKEN")
    assert_error(await _remove(auth, org["orgId"], member.user_id, owner), 404, "USER_NOT_FOUND")


async def test_an_admin_may_change_any_organisation(auth: AuthClient) -> None:
    owner, member = await auth.register(), await auth.register()
    admin = await auth.admin()
    org = await _create_org(auth, owner)

    added = await _add(auth, org["orgId"], member.user_id, admin)
    removed = await _remove(auth, org["orgId"], member.user_id, admin)

    assert added.status_code == 201, added.text
    assert removed.status_code == 204, removed.text
    assert_error(await _add(auth, str(uuid.uuid4()), member.user_id, admin), 404, "ORG_NOT_FOUND")
