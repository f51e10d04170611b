"""Issue 11 against a real `leaky-tokens up`, with the official `openai` SDK unchanged: the
gateway's /v1 API reaches the OpenAI, Qwen and Gemini stubs through the token service and
charges each pool exactly the usage the provider reported.

The stack trusts a validated API key for a whole minute, so a revoked key failing within a
second shows the revocation feed at work. Its limits are wide (gateway windows, leaky bucket)
so that only the quota decides; the stubs stream slowly enough for clients to leave mid-stream.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import Stack
from tests.e2e.journeys import Account, admin_env, login, register

pytestmark = pytest.mark.e2e

ADMIN_USERNAME = "e2e_inference_admin"
MODELS = {"openai": "gpt-4o-mini", "qwen": "qwen-turbo", "gemini": "gemini-2.5-flash"}
HELLO = [{"role": "user", "content": "Say hello to the gateway."}]


@pytest.fixture(scope="module")
def system(stack_env: tuple[Path, dict[str, str], str]) -> Iterator[Stack]:
    workdir, env, shape = stack_env
    running = Stack(workdir, env, shape)
    running.up(
        extra_env={
            **admin_env(ADMIN_USERNAME),
            "LEAKY_AUTH_CLIENT__API_KEY_CACHE_SECONDS": "60",
            "LEAKY_GATEWAY__RATE_LIMIT_REQUESTS": "100000",
            "LEAKY_GATEWAY__USER_LIMIT_REQUESTS": "100000",
            "LEAKY_GATEWAY__ADDRESS_LIMIT_REQUESTS": "100000",
            "LEAKY_TOKENS__BUCKET_CAPACITY": "1000000",
            "LEAKY_TOKENS__BUCKET_LEAK_PER_SECOND": "1000000",
            "LEAKY_STUBS__CHUNK_DELAY_MS": "20",
        }
    )
    try:
        yield running
    finally:
        running.stop_all()


@pytest.fixture(scope="module")
def gateway(system: Stack) -> Iterator[httpx.Client]:
    with system.client("gateway") as client:
        yield client


@pytest.fixture(scope="module")
def admin(gateway: httpx.Client) -> Account:
    account = Account("", ADMIN_USERNAME, "admin-password-123", "")
    return login(gateway, account)


class Tenant:
    """A fresh user with an API key and a pool per provider."""

    def __init__(self, gateway: httpx.Client, admin: Account, tokens: int = 100_000) -> None:
        self.gateway = gateway
        self.account = register(gateway, "inference")
        created = gateway.post(
            "/api/v1/auth/api-keys",
            headers=self.account.bearer,
            json={"userId": self.account.user_id, "name": "sdk"},
        )
        assert created.status_code == 201, created.text
        self.key = created.json()
        for provider in MODELS:
            self.set_quota(admin, provider, tokens)

    def set_quota(self, admin: Account, provider: str, tokens: int) -> None:
        response = self.gateway.put(
            "/api/v1/tokens/quota",
            headers=admin.bearer,
            json={"userId": self.account.user_id, "provider": provider, "totalTokens": tokens},
        )
        assert response.status_code == 200, response.text

    def remaining(self, provider: str) -> int:
        response = self.gateway.get(
            "/api/v1/tokens/quota",
            params={"userId": self.account.user_id, "provider": provider},
            headers=self.account.bearer,
        )
        assert response.status_code == 200, response.text
        value: int = response.json()["remainingTokens"]
        return value

    def client(self, system: Stack, **kwargs: Any) -> openai.OpenAI:
        return sdk(system.url("gateway") + "/v1", self.key["rawKey"], **kwargs)


@pytest.fixture
def tenant(gateway: httpx.Client, admin: Account) -> Tenant:
    return Tenant(gateway, admin)


# Every SDK client a test opens, closed after it (a leaked socket is a ResourceWarning error).
_OPENED: list[openai.OpenAI | httpx.Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPENED:
        _OPENED.pop().close()


def sdk(base_url: str, api_key: str, **kwargs: Any) -> openai.OpenAI:
    client = openai.OpenAI(base_url=base_url, api_key=api_key, **kwargs)
    _OPENED.append(client)
    return client


def test_models_lists_the_catalogue_with_each_provider_as_owner(
    system: Stack, tenant: Tenant
) -> None:
    client = tenant.client(system)
    models = {m.id: m.owned_by for m in client.models.list()}
    assert len(models) >= 6
    for provider in MODELS:
        assert sum(owner == provider for owner in models.values()) >= 2, models
    assert models["gpt-4o-mini"] == "openai"
    assert client.models.retrieve("qwen/qwen-turbo").owned_by == "qwen"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.code == "model_not_found"


@pytest.mark.parametrize("provider", list(MODELS))
def test_a_plain_completion_is_charged_exactly_the_reported_usage(
    system: Stack, tenant: Tenant, provider: str
) -> None:
    client = tenant.client(system)
    before = tenant.remaining(provider)
    raw = client.chat.completions.with_raw_response.create(
        model=MODELS[provider], messages=HELLO, max_tokens=40
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.model == MODELS[provider]
    assert completion.usage is not None
    assert completion.usage.completion_tokens > 0
    assert before - tenant.remaining(provider) == completion.usage.total_tokens
    assert raw.headers["x-request-id"]
    # OpenAI's rate-limit headers: requests from the gateway's window, tokens from the bucket
    assert int(raw.headers["x-ratelimit-limit-requests"]) == 100_000
    assert int(raw.headers["x-ratelimit-remaining-requests"]) < 100_000
    assert int(raw.headers["x-ratelimit-limit-tokens"]) > 0
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) >= 0
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    assert raw.headers["x-ratelimit-reset-tokens"].endswith("s")


@pytest.mark.parametrize("provider", list(MODELS))
def test_a_stream_is_charged_exactly_its_last_reported_usage(
    system: Stack, tenant: Tenant, provider: str
) -> None:
    client = tenant.client(system)
    before = tenant.remaining(provider)
    chunks = list(
        client.chat.completions.create(
            model=MODELS[provider],
            messages=HELLO,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length")
    assert set(finishes[:-1]) == {None}
    usage = chunks[-1].usage
    assert usage is not None
    assert not chunks[-1].choices
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert before - tenant.remaining(provider) == usage.total_tokens


@pytest.mark.parametrize("provider", list(MODELS))
def test_a_stream_without_include_usage_is_still_charged(
    system: Stack, tenant: Tenant, provider: str
) -> None:
    client = tenant.client(system)
    # The stubs are deterministic: the same messages and cap give the same usage.
    plain = client.chat.completions.create(model=MODELS[provider], messages=HELLO, max_tokens=30)
    assert plain.usage is not None
    before = tenant.remaining(provider)
    chunks = list(
        client.chat.completions.create(
            model=MODELS[provider], messages=HELLO, max_tokens=30, stream=True
        )
    )
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)  # the usage chunk we asked for upstream is gone
    assert before - tenant.remaining(provider) == plain.usage.total_tokens


def test_bad_requests_raise_the_sdks_exceptions(system: Stack, tenant: Tenant) -> None:
    client = tenant.client(system, max_retries=0)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-0-nonexistent", messages=HELLO)
    assert unknown.value.code == "model_not_found"
    assert unknown.value.request_id

    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="gpt-4o-mini", messages=[])
    assert bad.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as bad_cap:
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=0)
    assert bad_cap.value.param == "max_tokens"

    wrong_key = sdk(system.url("gateway") + "/v1", f"leaky_{uuid.uuid4()}_{'0' * 48}")
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong_key.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert refused.value.code == "invalid_api_key"
    assert tenant.remaining("openai") == 100_000  # nothing charged for any of these


def test_exhausted_quota_is_a_rate_limit_error_the_sdk_does_not_retry(
    system: Stack, gateway: httpx.Client, admin: Account
) -> None:
    tenant = Tenant(gateway, admin, tokens=10)  # less than a prompt and a minimum answer
    attempts: list[httpx.Request] = []
    counting = httpx.Client(event_hooks={"request": [attempts.append]})
    _OPENED.append(counting)
    client = tenant.client(system, max_retries=2, http_client=counting)
    with pytest.raises(openai.RateLimitError) as exhausted:
        client.chat.completions.create(model="qwen-turbo", messages=HELLO)
    assert exhausted.value.code == "insufficient_quota"
    assert exhausted.value.response.headers["x-should-retry"] == "false"
    assert len(attempts) == 1
    assert tenant.remaining("qwen") == 10  # refused with nothing charged


def test_a_small_pool_lowers_the_providers_max_tokens_instead_of_overspending(
    system: Stack, gateway: httpx.Client, admin: Account, tenant: Tenant
) -> None:
    # A prompt whose natural answer is long enough to be cut (the stubs are deterministic).
    natural = None
    for i in range(20):
        messages = [{"role": "user", "content": f"Tell me something, take {i}."}]
        plain = tenant.client(system).chat.completions.create(
            model="gpt-4o-mini", messages=messages, max_tokens=1000
        )
        assert plain.usage is not None
        if plain.usage.completion_tokens >= 24:
            natural = plain.usage
            break
    assert natural is not None
    small = Tenant(gateway, admin, tokens=natural.prompt_tokens + natural.completion_tokens - 4)
    completion = small.client(system).chat.completions.create(
        model="gpt-4o-mini", messages=messages, max_tokens=1000
    )
    assert completion.usage is not None
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == natural.completion_tokens - 4
    assert small.remaining("openai") == 0  # the whole pool, and not a token more


def test_a_revoked_key_fails_on_v1_within_a_second(
    system: Stack, gateway: httpx.Client, tenant: Tenant
) -> None:
    client = tenant.client(system, max_retries=0)
    assert client.models.list().data  # the key's validation is now cached (for a minute)
    revoked = gateway.delete(
        f"/api/v1/auth/api-keys/{tenant.key['id']}", headers=tenant.account.bearer
    )
    assert revoked.status_code == 204
    revoked_at = time.monotonic()
    refused_after: float | None = None
    while refused_after is None and time.monotonic() - revoked_at < 5:
        try:
            client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=5)
        except openai.AuthenticationError:
            refused_after = time.monotonic() - revoked_at
        else:
            time.sleep(0.02)
    assert refused_after is not None
    assert refused_after < 1.0, refused_after


def test_a_key_made_for_an_org_charges_the_orgs_pool(
    system: Stack, gateway: httpx.Client, admin: Account, tenant: Tenant
) -> None:
    created = gateway.post(
        "/api/v1/auth/orgs", headers=tenant.account.bearer, json={"name": "inference-org"}
    )
    assert created.status_code == 201, created.text
    org_id = created.json()["orgId"]
    key = gateway.post(
        "/api/v1/auth/api-keys",
        headers=tenant.account.bearer,
        json={"userId": tenant.account.user_id, "name": "org-sdk", "orgId": org_id},
    )
    assert key.status_code == 201, key.text
    assert key.json()["orgId"] == org_id
    pool = gateway.put(
        "/api/v1/tokens/quota/org",
        headers=admin.bearer,
        json={"orgId": org_id, "provider": "openai", "totalTokens": 5_000},
    )
    assert pool.status_code == 200, pool.text

    client = sdk(system.url("gateway") + "/v1", key.json()["rawKey"])
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=20)
    assert completion.usage is not None
    org_pool = gateway.get(
        "/api/v1/tokens/quota/org",
        params={"orgId": org_id, "provider": "openai"},
        # (the JWT predates the org; an API key sees membership at once)
        headers={"X-Api-Key": key.json()["rawKey"]},
    )
    assert org_pool.status_code == 200, org_pool.text
    assert org_pool.json()["remainingTokens"] == 5_000 - completion.usage.total_tokens
    assert tenant.remaining("openai") == 100_000  # the user's own pool is not touched

    stranger = register(gateway, "stranger")
    refused = gateway.post(
        "/api/v1/auth/api-keys",
        headers=stranger.bearer,
        json={"userId": stranger.user_id, "name": "not-mine", "orgId": org_id},
    )
    assert refused.status_code == 404, refused.text


def test_nothing_reaches_a_provider_unmetered_through_the_gateway(
    gateway: httpx.Client, tenant: Tenant, admin: Account
) -> None:
    user = {"X-Api-Key": tenant.key["rawKey"]}
    chat = gateway.post("/api/v1/openai/chat", headers=user, json={"prompt": "free tokens?"})
    assert chat.status_code == 403, chat.text
    assert chat.json()["code"] == "FORBIDDEN"
    faults = gateway.put("/api/v1/openai/faults", headers=user, json={"failureRate": 1.0})
    assert faults.status_code == 403
    assert gateway.get("/api/v1/openai/health").status_code == 200  # health stays public
    as_admin = gateway.post(
        "/api/v1/openai/chat", headers=admin.bearer, json={"prompt": "an operator's check"}
    )
    assert as_admin.status_code == 200, as_admin.text


def _set_faults(gateway: httpx.Client, admin: Account, provider: str, **faults: Any) -> None:
    response = gateway.put(f"/api/v1/{provider}/faults", headers=admin.bearer, json=faults)
    assert response.status_code == 200, response.text


def test_provider_failures_refund_everything_and_map_to_the_sdks_classes(
    system: Stack, gateway: httpx.Client, admin: Account, tenant: Tenant
) -> None:
    client = tenant.client(system, max_retries=0)
    try:
        # A throttle with a short hint is tried again by the adapter (the provider did no work).
        _set_faults(gateway, admin, "qwen", rateLimited=True, remainingCalls=1)
        # (DashScope's 429 has no retry hint: a provider 429 reaches the client, retryable.)
        with pytest.raises(openai.RateLimitError) as throttled:
            client.chat.completions.create(model="qwen-turbo", messages=HELLO, max_tokens=10)
        assert throttled.value.code == "rate_limit_exceeded"
        assert throttled.value.response.headers["retry-after"]
        assert throttled.value.response.headers.get("x-should-retry") != "false"

        _set_faults(gateway, admin, "openai", rateLimited=True, retryAfterMs=50, remainingCalls=1)
        retried = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=10)
        assert retried.usage is not None

        _set_faults(gateway, admin, "gemini", failureRate=1.0, remainingCalls=1)
        with pytest.raises(openai.InternalServerError) as failed:
            client.chat.completions.create(model="gemini-2.0-flash", messages=HELLO, max_tokens=10)
        assert failed.value.status_code == 502

        _set_faults(gateway, admin, "gemini", down=True, remainingCalls=2)
        with pytest.raises(openai.InternalServerError) as down:
            client.chat.completions.create(model="gemini-2.0-flash", messages=HELLO, max_tokens=10)
        assert down.value.status_code == 503
    finally:
        for provider in MODELS:
            gateway.delete(f"/api/v1/{provider}/faults", headers=admin.bearer)
    assert tenant.remaining("qwen") == 100_000
    assert tenant.remaining("gemini") == 100_000
    assert tenant.remaining("openai") == 100_000 - retried.usage.total_tokens
    status = gateway.get("/api/v1/tokens/status").json()
    breakers = status["inferenceProviders"]
    assert set(breakers) == set(MODELS)
    assert breakers["gemini"]["failedCallsInWindow"] >= 2  # the 500 and the 503 counted


def test_a_provider_cutting_its_stream_ends_the_clients_with_an_error_charging_what_streamed(
    system: Stack, gateway: httpx.Client, admin: Account, tenant: Tenant
) -> None:
    client = tenant.client(system, max_retries=0)
    natural = client.chat.completions.create(model="qwen-plus", messages=HELLO, max_tokens=200)
    assert natural.usage is not None
    before = tenant.remaining("qwen")
    seen = ""
    try:
        _set_faults(gateway, admin, "qwen", cutStreamAfter=3, remainingCalls=1)
        stream = client.chat.completions.create(
            model="qwen-plus", messages=HELLO, max_tokens=200, stream=True
        )

        def read_all() -> None:
            nonlocal seen
            for chunk in stream:
                if chunk.choices:
                    seen += chunk.choices[0].delta.content or ""

        with pytest.raises(openai.APIError) as cut:
            read_all()
    finally:
        gateway.delete("/api/v1/qwen/faults", headers=admin.bearer)
    assert cut.value.code == "provider_stream_cut"
    assert seen  # the chunks before the cut reached the client
    charged = before - tenant.remaining("qwen")
    assert natural.usage.prompt_tokens < charged < natural.usage.total_tokens
