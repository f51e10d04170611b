"""API keys (plan §1.3): issue once, list without secrets, validate, revoke, expire, tenancy."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tests.auth.auth_harness import AuthClient, StartAuth, assert_error, now_clock

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEYS = "/api/v1/auth/api-keys"
VALIDATE = "/api/v1/auth/api-keys/validate"


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def test_creating_a_key_answers_201_with_the_raw_key(auth: AuthClient) -> None:
    user = await auth.register()
    expires = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)

    response = await auth.http.post(
        KEYS,
        json={"userId": user.user_id, "name": "cli-access", "expiresAt": _iso(expires)},
        headers=user.headers,
    )

    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {
        "id",
        "userId",
        "name",
        "rawKey",
        "createdAt",
        "expiresAt",
        "orgId",
        "sessionId",
    }
    assert body["sessionId"] is None  # set only for an agent session's credential (issue 13)
    assert re.fullmatch(rf"leaky_{user.user_id}_[0-9a-f]{{48}}", body["rawKey"])
    assert uuid.UUID(body["id"])
    assert body["userId"] == user.user_id
    assert body["name"] == "cli-access"
    assert _parse(body["expiresAt"]) == expires
    assert abs(_parse(body["createdAt"]) - datetime.now(UTC)) < timedelta(minutes=1)


async def test_every_key_is_different(auth: AuthClient) -> None:
    user = await auth.register()

    raw = {(await auth.create_api_key(user, f"key-{i}"))["rawKey"] for i in range(3)}

    assert len(raw) == 3


async def test_a_key_without_an_expiry_never_expires(auth: AuthClient) -> None:
    user = await auth.register()

    created = await auth.create_api_key(user)
    validated = await auth.http.get(VALIDATE, headers={"X-Api-Key": created["rawKey"]})

    assert created["expiresAt"] is None
    assert validated.json()["expiresAt"] is None


async def test_the_owner_defaults_to_the_caller(auth: AuthClient) -> None:
    user = await auth.register()

    response = await auth.http.post(KEYS, json={"name": "mine"}, headers=user.headers)

    assert response.status_code == 201, response.text
    assert response.json()["userId"] == user.user_id


async def test_creating_a_key_without_credentials_is_401(auth: AuthClient) -> None:
    user = await auth.register()

    response = await auth.http.post(KEYS, json={"userId": user.user_id, "name": "unauthorized"})

    assert_error(response, 401, "AUTH_INVALID_KEY")
    listed = await auth.http.get(KEYS, params={"userId": user.user_id}, headers=user.headers)
    assert listed.json()["pagination"]["total"] == 0


async def test_a_key_needs_a_name(auth: AuthClient) -> None:
    user = await auth.register()

    for body in ({"userId": user.user_id}, {"name": ""}, {"name": "x" * 101}, {"name": 5}):
        response = await auth.http.post(KEYS, json=body, headers=user.headers)
        details = assert_error(response, 400, "INVALID_REQUEST")["details"]
        assert [d["field"] for d in details] == ["name"], body


async def test_an_expiry_in_the_past_is_rejected(auth: AuthClient) -> None:
    user = await auth.register()
    past = datetime.now(UTC) - timedelta(minutes=1)

    response = await auth.http.post(
        KEYS, json={"name": "stale", "expiresAt": _iso(past)}, headers=user.headers
    )

    body = assert_error(response, 400, "INVALID_REQUEST")
    assert body["message"] == "expiresAt must be in the future"
    assert body["details"] == [{"field": "expiresAt", "message": "must be in the future"}]


async def test_an_unparseable_expiry_is_rejected(auth: AuthClient) -> None:
    user = await auth.register()

    response = await auth.http.post(
        KEYS, json={"name": "k", "expiresAt": "next tuesday"}, headers=user.headers
    )

    body = assert_error(response, 400, "INVALID_REQUEST")
    assert [d["field"] for d in body["details"]] == ["expiresAt"]


async def test_the_list_shows_metadata_but_never_the_raw_key(auth: AuthClient) -> None:
    user = await auth.register()
    created = await auth.create_api_key(user, "cli-access")

    response = await auth.http.get(KEYS, params={"userId": user.user_id}, headers=user.headers)

    assert response.status_code == 200, response.text
    assert created["rawKey"] not in response.text
    assert created["rawKey"].rsplit("_", 1)[1] not in response.text
    body = response.json()
    assert body["pagination"] == {"page": 1, "page_size": 20, "total": 1, "total_pages": 1}
    [item] = body["items"]
    assert item["id"] == created["id"]
    assert item["name"] == "cli-access"
    assert item["createdAt"] == created["createdAt"]
    assert item["expiresAt"] is None
    assert item["status"] == "active"
    assert item["revokedAt"] is None
    assert "rawKey" not in item
    assert item["keyPreview"] == "…" + created["rawKey"][-8:]


async def test_the_list_pages_newest_first(start_auth: StartAuth) -> None:
    clock = now_clock()
    async with start_auth(clock=clock) as auth:
        user = await auth.register()
        ids = []
        for i in range(3):
            ids.append((await auth.create_api_key(user, f"key-{i}"))["id"])
            clock.advance(1)

        pages = []
        for page in (1, 2, 3, 4):
            response = await auth.http.get(
                KEYS,
                params={"userId": user.user_id, "page": page, "page_size": 1},
                headers=user.headers,
            )
            assert response.status_code == 200, response.text
            pages.append(response.json())

    assert [[i["id"] for i in p["items"]] for p in pages] == [[ids[2]], [ids[1]], [ids[0]], []]
    assert pages[0]["pagination"] == {"page": 1, "page_size": 1, "total": 3, "total_pages": 3}
    assert pages[3]["pagination"]["page"] == 4


async def test_paging_parameters_are_validated(auth: AuthClient) -> None:
    user = await auth.register()

    for params in ({"page": 0}, {"page_size": 0}, {"page_size": 101}, {"page": "x"}):
        response = await auth.http.get(KEYS, params=params, headers=user.headers)
        details = assert_error(response, 400, "INVALID_REQUEST")["details"]
        assert [d["field"] for d in details] == list(params)


async def test_a_user_may_not_touch_another_users_keys(auth: AuthClient) -> None:
    owner, intruder = await auth.register(), await auth.register()
    key = await auth.create_api_key(owner)

    listed = await auth.http.get(KEYS, params={"userId": owner.user_id}, headers=intruder.headers)
    created = await auth.http.post(
        KEYS, json={"userId": owner.user_id, "name": "sneaky"}, headers=intruder.headers
    )
    revoked = await auth.http.delete(
        KEYS, params={"userId": owner.user_id, "apiKeyId": key["id"]}, headers=intruder.headers
    )

    for response in (listed, created, revoked):
        assert_error(response, 403, "FORBIDDEN")
        assert key["rawKey"] not in response.text
    still = await auth.http.get(VALIDATE, headers={"X-Api-Key": key["rawKey"]})
    assert still.status_code == 200
    mine = await auth.http.get(KEYS, params={"userId": owner.user_id}, headers=owner.headers)
    assert mine.json()["pagination"]["total"] == 1


async def test_listing_an_unknown_users_keys_is_forbidden_to_a_user(auth: AuthClient) -> None:
    user = await auth.register()

    response = await auth.http.get(
        KEYS, params={"userId": "00000000-0000-0000-0000-000000000001"}, headers=user.headers
    )

    assert_error(response, 403, "FORBIDDEN")


async def test_a_user_cannot_revoke_another_users_key_by_naming_it_as_their_own(
    auth: AuthClient,
) -> None:
    owner, intruder = await auth.register(), await auth.register()
    key = await auth.create_api_key(owner)

    response = await auth.http.delete(
        KEYS, params={"userId": intruder.user_id, "apiKeyId": key["id"]}, headers=intruder.headers
    )

    assert_error(response, 404, "API_KEY_NOT_FOUND")
    assert (await auth.http.get(VALIDATE, headers={"X-Api-Key": key["rawKey"]})).status_code == 200


async def test_an_admin_may_list_and_revoke_anyones_keys(auth: AuthClient) -> None:
    admin, user = await auth.admin(), await auth.register()
    key = await auth.create_api_key(user)

    listed = await auth.http.get(KEYS, params={"userId": user.user_id}, headers=admin.headers)
    revoked = await auth.http.delete(
        KEYS, params={"userId": user.user_id, "apiKeyId": key["id"]}, headers=admin.headers
    )

    assert listed.status_code == 200, listed.text
    assert [i["id"] for i in listed.json()["items"]] == [key["id"]]
    assert revoked.status_code == 204, revoked.text
    assert_error(
        await auth.http.get(VALIDATE, headers={"X-Api-Key": key["rawKey"]}), 401, "AUTH_REVOKED_KEY"
    )


async def test_an_admin_may_create_a_key_for_a_user_but_not_for_a_missing_one(
    auth: AuthClient,
) -> None:
    admin, user = await auth.admin(), await auth.register()

    for_user = await auth.http.post(
        KEYS, json={"userId": user.user_id, "name": "ops"}, headers=admin.headers
    )
    for_nobody = await auth.http.post(
        KEYS, json={"userId": str(uuid.uuid4()), "name": "ops"}, headers=admin.headers
    )

    assert for_user.status_code == 201, for_user.text
    assert for_user.json()["rawKey"].startswith(f"leaky_{user.user_id}_")
    assert_error(for_nobody, 404, "USER_NOT_FOUND")


async def test_validating_a_key_answers_its_owner(auth: AuthClient) -> None:
    user = await auth.register()
    expires = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    key = await auth.create_api_key(user, "cli-access", expiresAt=_iso(expires))

    response = await auth.http.get(VALIDATE, headers={"X-Api-Key": key["rawKey"]})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body == {
        "userId": user.user_id,
        "username": user.username,
        "name": "cli-access",
        "expiresAt": body["expiresAt"],
        "roles": ["USER"],
        "apiKeyId": key["id"],
        "orgIds": [],
        "orgId": None,
        "sessionId": None,
        "feedSeq": body["feedSeq"],  # the principal-change feed's cursor (an int)
    }
    assert isinstance(body["feedSeq"], int)
    assert _parse(body["expiresAt"]) == expires


async def test_an_unknown_or_malformed_key_is_invalid(auth: AuthClient) -> None:
    user = await auth.register()
    real = (await auth.create_api_key(user))["rawKey"]
    unknown = real[:-6] + ("000000" if not real.endswith("000000") else "111111")

    for value in ("invalid_key_value", unknown, real.upper(), real + "0"):
        response = await auth.http.get(VALIDATE, headers={"X-Api-Key": value})
        body = assert_error(response, 401, "AUTH_INVALID_KEY")
        assert body["message"] == "invalid API key"


async def test_validation_without_a_key_is_401(auth: AuthClient) -> None:
    for headers in ({}, {"X-Api-Key": ""}, {"X-Api-Key": "   "}):
        response = await auth.http.get(VALIDATE, headers=headers)
        body = assert_error(response, 401, "AUTH_INVALID_KEY")
        assert "X-Api-Key" in body["message"]


async def test_a_revoked_key_is_rejected_as_revoked(auth: AuthClient) -> None:
    user = await auth.register()
    key = await auth.create_api_key(user)

    response = await auth.http.delete(
        KEYS, params={"userId": user.user_id, "apiKeyId": key["id"]}, headers=user.headers
    )

    assert response.status_code == 204, response.text
    assert response.content == b""
    rejected = await auth.http.get(VALIDATE, headers={"X-Api-Key": key["rawKey"]})
    body = assert_error(rejected, 401, "AUTH_REVOKED_KEY")
    assert body["message"] == "API key has been revoked"
    listed = await auth.http.get(KEYS, headers=user.headers)
    [item] = listed.json()["items"]
    assert item["status"] == "revoked"
    assert item["revokedAt"] is not None


async def test_revoking_a_key_twice_succeeds_both_times(auth: AuthClient) -> None:
    user = await auth.register()
    key = await auth.create_api_key(user)
    params = {"userId": user.user_id, "apiKeyId": key["id"]}

    first = await auth.http.delete(KEYS, params=params, headers=user.headers)
    second = await auth.http.delete(KEYS, params=params, headers=user.headers)

    assert (first.status_code, second.status_code) == (204, 204)


async def test_a_key_can_be_revoked_by_its_path(auth: AuthClient) -> None:
    user = await auth.register()
    key = await auth.create_api_key(user)

    response = await auth.http.delete(f"{KEYS}/{key['id']}", headers=user.headers)

    assert response.status_code == 204, response.text
    assert_error(
        await auth.http.get(VALIDATE, headers={"X-Api-Key": key["rawKey"]}), 401, "AUTH_REVOKED_KEY"
    )


async def test_revoking_an_unknown_key_is_404(auth: AuthClient) -> None:
    user = await auth.register()

    response = await auth.http.delete(
        KEYS, params={"userId": user.user_id, "apiKeyId": str(uuid.uuid4())}, headers=user.headers
    )

    body = assert_error(response, 404, "API_KEY_NOT_FOUND")
    assert body["message"] == "API key not found"


async def test_a_key_stops_working_when_it_expires(start_auth: StartAuth) -> None:
    clock = now_clock()
    async with start_auth(clock=clock) as auth:
        user = await auth.register()
        key = await auth.create_api_key(user, expiresAt=_iso(clock.now() + timedelta(seconds=60)))
        headers = {"X-Api-Key": key["rawKey"]}
        assert (await auth.http.get(VALIDATE, headers=headers)).status_code == 200

        clock.advance(60)

        body = assert_error(await auth.http.get(VALIDATE, headers=headers), 401, "AUTH_EXPIRED_KEY")
        assert body["message"] == "API key has expired"
        assert_error(await auth.me(headers), 401, "AUTH_EXPIRED_KEY")
        listed = await auth.http.get(KEYS, headers=user.headers)
        assert listed.json()["items"][0]["status"] == "expired"


async def test_an_api_key_is_a_credential_for_the_auth_service(auth: AuthClient) -> None:
    user = await auth.register()
    key = await auth.create_api_key(user)

    response = await auth.me({"X-Api-Key": key["rawKey"]})

    assert response.status_code == 200, response.text
    assert response.json() == {
        "userId": user.user_id,
        "username": user.username,
        "roles": ["USER"],
        "orgIds": [],
        "method": "api_key",
    }


async def test_a_revoked_or_unknown_api_key_is_no_credential(auth: AuthClient) -> None:
    user = await auth.register()
    key = await auth.create_api_key(user)
    await auth.http.delete(f"{KEYS}/{key['id']}", headers=user.headers)

    assert_error(await auth.me({"X-Api-Key": key["rawKey"]}), 401, "AUTH_REVOKED_KEY")
    assert_error(await auth.me({"X-Api-Key": "leaky_nope"}), 401, "AUTH_INVALID_KEY")
    assert_error(await auth.me({"X-Api-Key": ""}), 401, "AUTH_INVALID_KEY")


# -- the per-user cap on active keys (issue 10: 5 keys gave 5 rate-limit windows) -------------


async def test_concurrent_creations_never_pass_the_cap_on_active_keys(
    start_auth: StartAuth,
) -> None:
    async with start_auth(max_active_api_keys_per_user=3) as auth:
        user = await auth.register()

        answers = await asyncio.gather(
            *(
                auth.http.post(
                    KEYS, json={"userId": user.user_id, "name": f"k{i}"}, headers=user.headers
                )
                for i in range(12)
            )
        )

        assert sorted(r.status_code for r in answers) == [201] * 3 + [409] * 9
        refused = next(r for r in answers if r.status_code == 409)
        assert_error(refused, 409, "API_KEY_LIMIT")
        listed = await auth.http.get(KEYS, headers=user.headers)
        assert listed.json()["pagination"]["total"] == 3
        other = await auth.register()  # the cap is per user
        assert (
            await auth.http.post(KEYS, json={"name": "x"}, headers=other.headers)
        ).status_code == 201


async def test_revoked_and_expired_keys_leave_room_under_the_cap(start_auth: StartAuth) -> None:
    clock = now_clock()
    async with start_auth(clock=clock, max_active_api_keys_per_user=2) as auth:
        user = await auth.register()
        first = await auth.create_api_key(user, "first")
        await auth.create_api_key(
            user, "short", expiresAt=_iso(clock.now() + timedelta(seconds=30))
        )
        full = await auth.http.post(KEYS, json={"name": "third"}, headers=user.headers)
        assert_error(full, 409, "API_KEY_LIMIT")

        revoked = await auth.http.delete(f"{KEYS}/{first['id']}", headers=user.headers)
        assert revoked.status_code == 204
        await auth.create_api_key(user, "after-revoke")
        clock.advance(30)
        await auth.create_api_key(user, "after-expiry")
        full = await auth.http.post(KEYS, json={"name": "fifth"}, headers=user.headers)
        assert_error(full, 409, "API_KEY_LIMIT")
