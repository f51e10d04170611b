"""The provider stubs: scenario 7.1 answers, token usage, errors and run-time fault injection."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from leaky_tokens.providers import create_provider_app
from leaky_tokens.providers.schemas import ProviderName
from leaky_tokens.providers.usage import count_prompt_tokens, prompt_text
from leaky_tokens.shared.clock import FakeClock
from leaky_tokens.shared.tokenizer import count_text

ERROR_FIELDS = {"message", "timestamp", "code", "requestId"}
TOKEN = "stub-test-internal-token"
INTERNAL = {"X-Internal-Token": TOKEN}
NO_FAULTS = {
    "failureRate": 0.0,
    "latencyMs": 0,
    "down": False,
    "rateLimited": False,
    "retryAfterMs": 1000,
    "hang": False,
    "chunkDelayMs": None,
    "cutStreamAfter": None,
    "errorEventAfter": None,
    "errorAsArray": False,
    "remainingCalls": None,
}

# The request bodies of scenario 7.1, steps 1-3.
PLAN_REQUESTS: dict[ProviderName, tuple[dict[str, Any], str]] = {
    "qwen": ({"messages": [{"role": "user", "content": "Hello"}]}, "Stubbed Qwen response"),
    "gemini": ({"contents": [{"parts": [{"text": "Hello"}]}]}, "Stubbed Gemini response"),
    "openai": (
        {"model": "gpt-4", "messages": [{"role": "user", "content": "Hello"}]},
        "Stubbed OpenAI response",
    ),
}


def stub_app(provider: ProviderName = "openai", *, seed: int = 0) -> FastAPI:
    return create_provider_app(
        provider,
        internal_token=TOKEN,
        log_access=False,
        rng=random.Random(seed),
        clock=FakeClock(),
    )


@pytest.fixture
async def openai() -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(stub_app("openai")) as client:
        yield client


def client_for(app: FastAPI) -> httpx.AsyncClient:
    """A client that carries the internal token, as the gateway does for an ADMIN."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test", headers=INTERNAL
    )


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body.keys() >= ERROR_FIELDS
    assert body["code"] == code
    assert body["requestId"] == response.headers["x-request-id"]
    assert body["timestamp"].endswith("Z")
    return dict(body)


# --- scenario 7.1 -------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["qwen", "gemini", "openai"])
async def test_scenario_7_1_chat_answers_with_the_stub_reply(provider: ProviderName) -> None:
    request, message = PLAN_REQUESTS[provider]
    async with client_for(stub_app(provider)) as client:
        response = await client.post(f"/api/v1/{provider}/chat", json=request)

    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"id", "provider", "received", "created", "message", "usage"}
    prefix, _, rest = body["id"].partition("-")
    assert prefix == provider
    assert uuid.UUID(rest).version == 4
    assert body["provider"] == provider
    assert body["received"] == request
    assert body["created"] == "2026-01-01T00:00:00.000Z"
    assert body["message"] == message
    assert set(body["usage"]) == {"promptTokens", "completionTokens", "totalTokens"}


async def test_each_reply_has_a_fresh_id(openai: httpx.AsyncClient) -> None:
    first = await openai.post("/api/v1/openai/chat", json={"prompt": "a"})
    second = await openai.post("/api/v1/openai/chat", json={"prompt": "a"})
    assert first.json()["id"] != second.json()["id"]


# --- usage --------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["qwen", "gemini", "openai"])
async def test_usage_counts_the_prompt_text_and_the_reply_with_the_tokenizer(
    provider: ProviderName,
) -> None:
    request, message = PLAN_REQUESTS[provider]
    async with client_for(stub_app(provider)) as client:
        response = await client.post(f"/api/v1/{provider}/chat", json=request)

    usage = response.json()["usage"]
    assert usage["promptTokens"] == count_text(provider, "", "Hello") == 1
    assert usage["completionTokens"] == count_text(provider, "", message) > 0
    assert usage["totalTokens"] == usage["promptTokens"] + usage["completionTokens"]


async def test_usage_of_the_token_service_prompt_shape(openai: httpx.AsyncClient) -> None:
    response = await openai.post("/api/v1/openai/chat", json={"prompt": "令牌网关" * 10})
    assert response.json()["usage"]["promptTokens"] == count_text("openai", "", "令牌网关" * 10)


async def test_usage_is_zero_prompt_tokens_without_text(openai: httpx.AsyncClient) -> None:
    response = await openai.post("/api/v1/openai/chat", json={"model": "gpt-4"})
    assert response.status_code == 200
    assert response.json()["usage"]["promptTokens"] == 0


def test_prompt_text_gathers_every_text_field_but_not_metadata() -> None:
    body = {
        "model": "gpt-4",
        "system": "S",
        "messages": [
            {"role": "system", "content": "ab"},
            {"role": "user", "content": [{"type": "text", "text": "cd"}, {"type": "image"}]},
        ],
        "contents": [{"role": "user", "parts": [{"text": "ef"}, {"text": "g"}]}],
        "input": {"prompt": ["h", "i"]},
        "temperature": 0.2,
    }
    assert prompt_text(body) == "Sabcdefghi"
    assert count_prompt_tokens("openai", body) == count_text("openai", "gpt-4", "Sabcdefghi")


def test_prompt_text_survives_deep_nesting() -> None:
    body: dict[str, Any] = {"prompt": "abcd"}
    for _ in range(10_000):
        body = {"n": [body]}
    assert count_prompt_tokens("openai", body) == 1


# --- request errors -----------------------------------------------------------------------


async def test_malformed_json_is_a_400_in_our_error_shape(openai: httpx.AsyncClient) -> None:
    response = await openai.post(
        "/api/v1/openai/chat", content=b'{"prompt": ', headers={"content-type": "application/json"}
    )
    body = assert_error(response, 400, "INVALID_REQUEST")
    assert body["message"] == "malformed JSON body"


@pytest.mark.parametrize("content", [b"[1, 2]", b'"hello"', b"42", b"null"])
async def test_a_json_body_that_is_not_an_object_is_a_400(
    openai: httpx.AsyncClient, content: bytes
) -> None:
    response = await openai.post(
        "/api/v1/openai/chat", content=content, headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "INVALID_REQUEST")


async def test_a_missing_body_is_a_400(openai: httpx.AsyncClient) -> None:
    response = await openai.post("/api/v1/openai/chat")
    assert_error(response, 400, "INVALID_REQUEST")


@pytest.mark.parametrize("other", ["qwen", "gemini", "anthropic"])
async def test_another_providers_path_is_a_404_in_our_error_shape(
    openai: httpx.AsyncClient, other: str
) -> None:
    response = await openai.post(f"/api/v1/{other}/chat", json={"prompt": "hi"})
    assert_error(response, 404, "NOT_FOUND")


def test_an_unknown_provider_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="unknown provider"):
        create_provider_app("anthropic", log_access=False)  # type: ignore[arg-type]


# --- faults -------------------------------------------------------------------------------


async def test_no_faults_by_default(openai: httpx.AsyncClient) -> None:
    response = await openai.get("/api/v1/openai/faults")
    assert response.status_code == 200
    assert response.json() == NO_FAULTS


@pytest.mark.parametrize("headers", [{}, {"X-Internal-Token": "guess"}])
@pytest.mark.parametrize(
    ("method", "body"), [("GET", None), ("PUT", {"down": True}), ("DELETE", None)]
)
async def test_fault_control_needs_the_internal_token(
    headers: dict[str, str], method: str, body: Any
) -> None:
    app = stub_app("openai")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers
    ) as stranger:
        response = await stranger.request(method, "/api/v1/openai/faults", json=body)
        chat = await stranger.post("/api/v1/openai/chat", json={"prompt": "hi"})
    assert_error(response, 401, "AUTH_INVALID_INTERNAL_TOKEN")
    assert chat.status_code == 200  # nothing was switched on


async def test_without_a_configured_token_nobody_can_set_faults() -> None:
    app = create_provider_app("qwen", log_access=False)
    assert len(app.state.internal_token) >= 32
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        response = await client.put("/api/v1/qwen/faults", json={"down": True}, headers=INTERNAL)
    assert_error(response, 401, "AUTH_INVALID_INTERNAL_TOKEN")


async def test_put_faults_answers_and_keeps_the_current_faults(openai: httpx.AsyncClient) -> None:
    faults = {
        **NO_FAULTS,
        "failureRate": 0.25,
        "latencyMs": 10,
        "down": True,
        "rateLimited": True,
        "retryAfterMs": 250,
        "chunkDelayMs": 5,
        "cutStreamAfter": 3,
        "errorEventAfter": 2,
        "errorAsArray": True,
        "remainingCalls": 4,
    }
    put = await openai.put("/api/v1/openai/faults", json=faults)
    assert put.status_code == 200
    assert put.json() == faults
    assert (await openai.get("/api/v1/openai/faults")).json() == faults


async def test_put_faults_replaces_the_whole_set(openai: httpx.AsyncClient) -> None:
    await openai.put("/api/v1/openai/faults", json={"failureRate": 0.5, "down": True})
    put = await openai.put("/api/v1/openai/faults", json={"latencyMs": 5})
    assert put.json() == {**NO_FAULTS, "latencyMs": 5}


async def test_down_answers_503_service_unavailable(openai: httpx.AsyncClient) -> None:
    await openai.put("/api/v1/openai/faults", json={"down": True})
    response = await openai.post("/api/v1/openai/chat", json={"prompt": "hi"})
    body = assert_error(response, 503, "SERVICE_UNAVAILABLE")
    assert body["message"] == "provider is down"


async def test_failure_rate_one_answers_500_provider_error(openai: httpx.AsyncClient) -> None:
    await openai.put("/api/v1/openai/faults", json={"failureRate": 1.0})
    for _ in range(5):
        response = await openai.post("/api/v1/openai/chat", json={"prompt": "hi"})
        body = assert_error(response, 500, "PROVIDER_ERROR")
        assert body["message"] == "simulated provider failure"


async def test_failure_rate_half_follows_the_seeded_random_source() -> None:
    seed, calls = 7, 40
    reference = random.Random(seed)
    expected = [500 if reference.random() < 0.5 else 200 for _ in range(calls)]
    assert {200, 500} <= set(expected)

    async with client_for(stub_app("qwen", seed=seed)) as client:
        await client.put("/api/v1/qwen/faults", json={"failureRate": 0.5})
        statuses = [
            (await client.post("/api/v1/qwen/chat", json={"prompt": "hi"})).status_code
            for _ in range(calls)
        ]
    assert statuses == expected


async def test_latency_is_added_before_answering(openai: httpx.AsyncClient) -> None:
    await openai.put("/api/v1/openai/faults", json={"latencyMs": 50})
    started = time.perf_counter()
    response = await openai.post("/api/v1/openai/chat", json={"prompt": "hi"})
    elapsed = time.perf_counter() - started
    assert response.status_code == 200
    assert elapsed >= 0.05


async def test_latency_is_added_before_a_failure_too(openai: httpx.AsyncClient) -> None:
    await openai.put("/api/v1/openai/faults", json={"latencyMs": 50, "down": True})
    started = time.perf_counter()
    response = await openai.post("/api/v1/openai/chat", json={"prompt": "hi"})
    elapsed = time.perf_counter() - started
    assert response.status_code == 503
    assert elapsed >= 0.05


async def test_delete_faults_clears_them(openai: httpx.AsyncClient) -> None:
    await openai.put("/api/v1/openai/faults", json={"failureRate": 1.0, "down": True})

    deleted = await openai.delete("/api/v1/openai/faults")

    assert deleted.status_code == 204
    assert deleted.content == b""
    faults = await openai.get("/api/v1/openai/faults")
    assert faults.json() == NO_FAULTS
    chat = await openai.post("/api/v1/openai/chat", json={"prompt": "hi"})
    assert chat.status_code == 200


async def test_faults_do_not_touch_health_or_fault_control(openai: httpx.AsyncClient) -> None:
    await openai.put("/api/v1/openai/faults", json={"failureRate": 1.0, "down": True})
    assert (await openai.get("/api/v1/openai/health")).status_code == 200
    assert (await openai.get("/api/v1/openai/faults")).status_code == 200


async def test_faults_belong_to_one_stub() -> None:
    async with client_for(stub_app("qwen")) as qwen, client_for(stub_app("gemini")) as gemini:
        await qwen.put("/api/v1/qwen/faults", json={"down": True})
        response = await gemini.post("/api/v1/gemini/chat", json={"prompt": "hi"})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "faults",
    [
        {"failureRate": -0.1},
        {"failureRate": 1.5},
        {"failureRate": "0.5"},
        {"failureRate": True},
        {"latencyMs": -1},
        {"latencyMs": 60_001},
        {"latencyMs": 1.5},
        {"latencyMs": "10"},
        {"down": "yes"},
        {"down": 1},
        {"failurerate": 1.0},
        {"retryAfterMs": -1},
        {"cutStreamAfter": -1},
        {"errorEventAfter": "2"},
        {"remainingCalls": 0},
        {"hang": "no"},
        [],
    ],
)
async def test_invalid_faults_are_a_400_and_change_nothing(
    openai: httpx.AsyncClient, faults: Any
) -> None:
    await openai.put("/api/v1/openai/faults", json={"latencyMs": 1})

    response = await openai.put("/api/v1/openai/faults", json=faults)

    assert_error(response, 400, "INVALID_REQUEST")
    current = await openai.get("/api/v1/openai/faults")
    assert current.json() == {**NO_FAULTS, "latencyMs": 1}


async def test_malformed_faults_json_is_a_400(openai: httpx.AsyncClient) -> None:
    response = await openai.put(
        "/api/v1/openai/faults", content=b"{", headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "INVALID_REQUEST")


# --- health, envelope, docs ---------------------------------------------------------------


@pytest.mark.parametrize("provider", ["qwen", "gemini", "openai"])
async def test_health_is_up(provider: ProviderName) -> None:
    async with client_for(stub_app(provider)) as client:
        response = await client.get(f"/api/v1/{provider}/health")
    assert response.status_code == 200
    assert response.json() == {"service": f"{provider}-stub", "status": "UP"}


async def test_x_request_id_is_echoed(openai: httpx.AsyncClient) -> None:
    ok = await openai.post(
        "/api/v1/openai/chat", json={"prompt": "hi"}, headers={"X-Request-Id": "trace-123"}
    )
    failed = await openai.post(
        "/api/v1/openai/chat", content=b"{", headers={"X-Request-Id": "trace-456"}
    )
    assert ok.headers["x-request-id"] == "trace-123"
    assert failed.headers["x-request-id"] == "trace-456"
    assert failed.json()["requestId"] == "trace-456"


async def test_openapi_documents_the_response_models(openai: httpx.AsyncClient) -> None:
    schema = (await openai.get("/openapi.json")).json()
    components = schema["components"]["schemas"]
    assert {
        "ChatRead",
        "UsageRead",
        "FaultsRead",
        "FaultsUpdate",
        "HealthRead",
    } <= components.keys()
    assert set(components["UsageRead"]["properties"]) == {
        "promptTokens",
        "completionTokens",
        "totalTokens",
    }
    assert set(schema["paths"]) >= {
        "/api/v1/openai/chat",
        "/api/v1/openai/faults",
        "/api/v1/openai/health",
        "/v1/chat/completions",
        "/v1/models",
        "/v1/models/{model}",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/responses/{response_id}",
    }
