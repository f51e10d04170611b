"""Plan §4.4 against real processes: the openai stub runs apart (`serve openai`) from the rest
(`up --skip openai`), so it can fail on request (fault injection) or really stop.

The bucket leaks slowly here (1 token/s), so a consume after a failure shows whether the failed
request's tokens went back into the bucket: `used` is then exactly that consume's amount.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Process, Stack, free_ports
from tests.e2e.journeys import Account, login, register

pytestmark = pytest.mark.e2e

ERROR_FIELDS = {"message", "timestamp", "code", "requestId"}
ADMIN_USERNAME = "e2e_provider_admin"
ADMIN_PASSWORD = "admin-password-123"
QUOTA = 1000
TOKENS = 25


class ProviderStack:
    """Everything but openai in one process, openai in its own on a port fixed in advance."""

    def __init__(self, stack: Stack, openai_port: int) -> None:
        self.stack, self.openai_port = stack, openai_port
        self.openai: Process = stack.serve("openai", openai_port)

    def stop_openai(self) -> None:
        self.openai.kill()

    def start_openai(self) -> None:
        self.openai = self.stack.serve("openai", self.openai_port, name="openai-again")


@pytest.fixture(scope="module")
def provider_stack(stack_env: tuple[Path, dict[str, str], str]) -> Iterator[ProviderStack]:
    workdir, env, shape = stack_env
    running = Stack(workdir, env, shape)
    (openai_port,) = free_ports(1)
    try:
        running.up(
            "--skip",
            "openai",
            extra_env={
                "LEAKY_ADMIN_USERNAME": ADMIN_USERNAME,
                "LEAKY_ADMIN_PASSWORD": ADMIN_PASSWORD,
                # where the token service finds the openai stub started below
                "LEAKY_PORTS__OPENAI": str(openai_port),
                "LEAKY_TOKENS__BUCKET_LEAK_PER_SECOND": "1",
                # a few failures must not open the provider breaker; if it did, briefly
                "LEAKY_TOKENS__BREAKER_MINIMUM_CALLS": "10",
                "LEAKY_TOKENS__BREAKER_OPEN_SECONDS": "1",
            },
        )
        yield ProviderStack(running, openai_port)
    finally:
        running.stop_all()


@pytest.fixture(scope="module")
def tokens(provider_stack: ProviderStack) -> Iterator[httpx.Client]:
    with provider_stack.stack.client("tokens") as client:
        yield client


@pytest.fixture
def user(provider_stack: ProviderStack, tokens: httpx.Client) -> Account:
    with provider_stack.stack.client("auth") as auth:
        admin = login(auth, Account("", ADMIN_USERNAME, ADMIN_PASSWORD, ""))
        account = register(auth)
    response = tokens.put(
        "/api/v1/tokens/quota",
        headers=admin.bearer,
        json={"userId": account.user_id, "provider": "openai", "totalTokens": QUOTA},
    )
    assert response.status_code == 200, response.text
    return account


def consume(tokens: httpx.Client, account: Account, prompt: str) -> httpx.Response:
    return tokens.post(
        "/api/v1/tokens/consume",
        headers=account.bearer,
        json={"userId": account.user_id, "provider": "openai", "tokens": TOKENS, "prompt": prompt},
    )


def remaining_tokens(tokens: httpx.Client, account: Account) -> int:
    response = tokens.get(
        "/api/v1/tokens/quota",
        params={"userId": account.user_id, "provider": "openai"},
        headers=account.bearer,
    )
    assert response.status_code == 200, response.text
    value: int = response.json()["remainingTokens"]
    return value


def assert_provider_failure(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 502, response.text
    body: dict[str, Any] = response.json()
    assert body.keys() >= ERROR_FIELDS
    assert body["message"] == "provider call failed"
    assert body["code"] == "PROVIDER_ERROR"
    assert body["requestId"] == response.headers["X-Request-Id"]
    assert body["details"] == [{"provider": "openai", "reason": reason}]


def assert_works_again(tokens: httpx.Client, account: Account) -> None:
    response = consume(tokens, account, "Back again")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["allowed"] is True
    assert body["providerResponse"]["message"] == "Stubbed OpenAI response"
    # the failed call's tokens left the bucket: it holds only this call's
    assert body["used"] == TOKENS
    assert remaining_tokens(tokens, account) == QUOTA - TOKENS


def test_scenario_4_4_provider_failure_injected(
    provider_stack: ProviderStack, tokens: httpx.Client, user: Account
) -> None:
    internal = {"X-Internal-Token": provider_stack.stack.internal_token()}
    with provider_stack.stack.client("openai", headers=internal) as openai:
        down = openai.put("/api/v1/openai/faults", json={"down": True})
        assert down.status_code == 200, down.text
        try:
            failed = consume(tokens, user, "This will fail")
        finally:
            assert openai.delete("/api/v1/openai/faults").status_code == 204

    assert_provider_failure(failed, "provider answered 503")
    assert remaining_tokens(tokens, user) == QUOTA
    assert_works_again(tokens, user)


def test_scenario_4_4_provider_failure_stub_stopped(
    provider_stack: ProviderStack, tokens: httpx.Client, user: Account
) -> None:
    provider_stack.stop_openai()
    try:
        failed = consume(tokens, user, "This will fail")
    finally:
        provider_stack.start_openai()

    assert_provider_failure(failed, "provider unreachable")
    assert remaining_tokens(tokens, user) == QUOTA
    assert_works_again(tokens, user)
