"""The HTTP envelope as the auth service shows it: error bodies, request ids, headers, metrics."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import text

from leaky_tokens.shared.clock import FakeClock
from tests.auth.auth_harness import AuthClient, StartAuth, assert_error

pytestmark = pytest.mark.asyncio(loop_scope="module")

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def _has_security_headers(headers: httpx.Headers) -> bool:
    return all(headers.get(k) == v for k, v in SECURITY_HEADERS.items())


async def test_an_unknown_path_answers_404_in_our_error_shape(auth: AuthClient) -> None:
    response = await auth.http.get("/api/v1/auth/nothing-here")

    body = assert_error(response, 404, "NOT_FOUND")
    assert body["message"] == "no such resource"
    assert response.headers["content-type"] == "application/json"


async def test_a_wrong_method_answers_405_in_our_error_shape(auth: AuthClient) -> None:
    response = await auth.http.put("/api/v1/auth/register", json={})

    body = assert_error(response, 405, "METHOD_NOT_ALLOWED")
    assert body["message"] == "method not allowed"
    assert "POST" in response.headers["allow"]


async def test_a_missing_query_parameter_is_named(auth: AuthClient) -> None:
    user = await auth.register()

    response = await auth.http.delete(
        "/api/v1/auth/api-keys", params={"userId": user.user_id}, headers=user.headers
    )

    body = assert_error(response, 400, "INVALID_REQUEST")
    assert body["message"] == "missing required apiKeyId"
    assert body["details"] == [{"field": "apiKeyId", "message": "missing required query parameter"}]


async def test_malformed_query_and_path_parameters_are_named(auth: AuthClient) -> None:
    user = await auth.register()

    bad_query = await auth.http.delete(
        "/api/v1/auth/api-keys", params={"apiKeyId": "not-a-uuid"}, headers=user.headers
    )
    bad_path = await auth.http.post(
        "/api/v1/auth/orgs/not-a-uuid/members", json={"userId": user.user_id}, headers=user.headers
    )

    assert [d["field"] for d in assert_error(bad_query, 400, "INVALID_REQUEST")["details"]] == [
        "apiKeyId"
    ]
    assert [d["field"] for d in assert_error(bad_path, 400, "INVALID_REQUEST")["details"]] == [
        "org_id"
    ]


async def test_a_request_id_sent_by_the_client_is_echoed(auth: AuthClient) -> None:
    request_id = f"client-{uuid.uuid4().hex}"

    ok = await auth.http.get("/oauth2/jwks", headers={"X-Request-Id": request_id})
    failed = await auth.http.get("/api/v1/auth/me", headers={"X-Request-Id": request_id})

    assert ok.headers["x-request-id"] == request_id
    assert failed.headers["x-request-id"] == request_id
    assert assert_error(failed, 401, "AUTH_INVALID_KEY")["requestId"] == request_id


async def test_a_request_id_is_generated_when_none_or_a_malformed_one_is_sent(
    auth: AuthClient,
) -> None:
    responses = [
        await auth.http.get("/api/v1/auth/me"),
        await auth.http.get("/api/v1/auth/me"),
        await auth.http.get("/api/v1/auth/me", headers={"X-Request-Id": "bad id!"}),
        await auth.http.get("/api/v1/auth/me", headers={"X-Request-Id": "x" * 200}),
    ]

    ids = [r.headers["x-request-id"] for r in responses]
    assert all(re.fullmatch(r"req_[0-9a-f]{32}", i) for i in ids), ids
    assert len(set(ids)) == 4
    assert [r.json()["requestId"] for r in responses] == ids


async def test_success_and_error_answers_carry_the_security_headers(auth: AuthClient) -> None:
    responses = [
        await auth.http.get("/oauth2/jwks"),
        await auth.http.get("/api/v1/auth/me"),
        await auth.http.get("/nowhere"),
        await auth.http.patch("/api/v1/auth/login"),
        await auth.http.post("/api/v1/auth/register", content=b"x" * (1024 * 1024 + 1)),
        await auth.http.get("/metrics"),
    ]

    assert [r.status_code for r in responses] == [200, 401, 404, 405, 413, 200]
    for response in responses:
        assert _has_security_headers(response.headers), (response.url, response.headers)
        assert response.headers["x-request-id"]


async def test_the_health_endpoint_reports_the_database(auth: AuthClient) -> None:
    response = await auth.http.get("/api/v1/auth/health")

    assert response.status_code == 200, response.text
    assert response.json() == {"service": "auth", "status": "UP", "checks": {"database": "UP"}}


async def test_metrics_are_served_as_prometheus_text(auth: AuthClient) -> None:
    await auth.http.get("/oauth2/jwks")

    response = await auth.http.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE http_requests_total counter" in response.text
    assert re.search(
        r'http_requests_total\{method="GET",route="/oauth2/jwks",service="auth",status="200"\} '
        r"[1-9]",
        response.text,
    ), response.text
    assert "http_request_duration_seconds_bucket" in response.text


async def test_an_unexpected_failure_answers_500_without_internals(
    start_auth: StartAuth, caplog: pytest.LogCaptureFixture
) -> None:
    async with start_auth() as auth:
        owner = await auth.register()
        async with auth.service.db.transaction() as session:
            await session.execute(text("DROP TABLE org_member"))

        response = await auth.http.get("/api/v1/auth/orgs", headers=owner.headers)

    body = assert_error(response, 500, "INTERNAL_ERROR")
    assert body["message"] == "internal server error"
    assert "org_member" not in response.text
    assert "Traceback" not in response.text
    assert _has_security_headers(response.headers)
    assert any(r.getMessage() == "unhandled error" for r in caplog.records)


async def test_error_timestamps_come_from_the_services_clock(start_auth: StartAuth) -> None:
    clock = FakeClock(datetime(2031, 5, 6, 7, 8, 9, 123000, tzinfo=UTC))
    async with start_auth(clock=clock) as auth:
        first = await auth.http.get("/api/v1/auth/nothing-here")
        clock.advance(90)
        invalid = await auth.http.post("/api/v1/auth/login", json={})  # another handler

    assert assert_error(first, 404, "NOT_FOUND")["timestamp"] == "2031-05-06T07:08:09.123Z"
    assert assert_error(invalid, 400, "INVALID_REQUEST")["timestamp"] == "2031-05-06T07:09:39.123Z"
