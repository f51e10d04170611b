"""Error bodies follow the API face of their path: OpenAI's on /v1 (but the agent API's paths),
DESIGN.md's everywhere else — including the gateway's own refusals."""

from __future__ import annotations

import orjson
import pytest

from leaky_tokens.shared import http
from leaky_tokens.shared.http import error_response, face_of


@pytest.mark.parametrize(
    ("path", "face"),
    [
        ("/v1/chat/completions", "openai"),
        ("/v1/models", "openai"),
        ("/v1/models/openai/gpt-4o-mini", "openai"),
        ("/v1/responses", "openai"),
        ("/v1/no-such-thing", "openai"),
        ("/v1/sessions/abc", "agent"),  # the agent API keeps its own envelope (issue 13)
        ("/v1/health", "agent"),
        ("/v1/auth/token", "agent"),
        ("/v1/s/credential/chat/completions", "openai"),  # a session's proxy is the OpenAI API
        ("/api/v1/tokens/consume", "plan"),
        ("/v10/chat", "plan"),
        ("/health", "plan"),
    ],
)
def test_the_face_is_chosen_by_path(path: str, face: str) -> None:
    assert face_of(path) == face


def _rendered(
    face: http.Face, *args: object, **kwargs: object
) -> tuple[int, dict[str, str], dict[str, object]]:
    token = http._face.set(face)
    try:
        response = error_response(*args, **kwargs)  # type: ignore[arg-type]
    finally:
        http._face.reset(token)
    return response.status_code, dict(response.headers), orjson.loads(response.body)


def test_openai_face_renders_openai_errors_with_the_retry_headers_the_sdk_reads() -> None:
    status, headers, body = _rendered(
        "openai", 429, "RATE_LIMITED", "rate limit exceeded", headers={"Retry-After": "3"}
    )
    assert status == 429
    assert body == {
        "error": {
            "message": "rate limit exceeded",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    assert headers["retry-after-ms"] == "3000"
    assert "x-should-retry" not in headers


def test_insufficient_quota_tells_the_sdk_not_to_retry() -> None:
    _, headers, body = _rendered(
        "openai",
        429,
        "INSUFFICIENT_QUOTA",
        "quota exhausted",
        openai_type="insufficient_quota",
        openai_code="insufficient_quota",
    )
    assert body["error"] == {
        "message": "quota exhausted",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }
    assert headers["x-should-retry"] == "false"


def test_the_param_is_the_first_field_named_and_auth_codes_are_openais() -> None:
    _, _, bad = _rendered(
        "openai", 400, "INVALID_REQUEST", "bad", details=[{"field": "messages", "message": "x"}]
    )
    assert bad["error"]["param"] == "messages"
    assert bad["error"]["type"] == "invalid_request_error"
    _, _, revoked = _rendered("openai", 401, "AUTH_REVOKED_KEY", "API key has been revoked")
    assert revoked["error"]["code"] == "invalid_api_key"
    _, _, outage = _rendered("openai", 503, "SERVICE_UNAVAILABLE", "Circuit breaker open")
    assert outage["error"]["type"] == "server_error"


def test_the_plan_face_keeps_designs_body() -> None:
    _, _, body = _rendered("plan", 404, "NOT_FOUND", "no such route")
    assert {"message", "timestamp", "code", "requestId"} <= body.keys()
    assert "error" not in body


def test_the_agent_face_renders_the_envelope_with_the_agent_code_table() -> None:
    # Errors raised before the agent router answers (a 413 at the edge, say) keep its envelope.
    status, headers, body = _rendered(
        "agent", 401, "AUTH_REQUIRED", "no credential", headers={"Retry-After": "1"}
    )
    assert status == 401
    assert headers["retry-after"] == "1"
    assert body["success"] is False
    assert body["data"] is None
    assert body["error"] == {"code": "AUTH_INVALID_KEY", "message": "no credential"}
    meta = body["meta"]
    assert isinstance(meta, dict)
    assert set(meta) == {"request_id", "timestamp"}
