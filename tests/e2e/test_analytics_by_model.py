"""The usage-event contract end to end (issues 11 and 12), against a real `leaky-tokens up` on
both shapes: a /v1 call through the gateway with the official `openai` SDK reaches analytics
with its model and token kinds — /usage items carry them, /report?byModel=true sums them to
exactly the usage the provider reported, with a latency, and /consume events stay model-less."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import Stack
from tests.e2e.journeys import Account, admin_env, login, register

pytestmark = pytest.mark.e2e

ADMIN_USERNAME = "e2e_by_model_admin"
HELLO = [{"role": "user", "content": "Count the gateway's tokens, please."}]


@pytest.fixture(scope="module")
def system(stack_env: tuple[Path, dict[str, str], str]) -> Iterator[Stack]:
    workdir, env, shape = stack_env
    running = Stack(workdir, env, shape)
    running.up(extra_env=admin_env(ADMIN_USERNAME))
    try:
        yield running
    finally:
        running.stop_all()


def _eventually_report(
    gateway: httpx.Client, user: Account, provider: str, check: Any, within: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        response = gateway.get(
            "/api/v1/analytics/report",
            params={"provider": provider, "byModel": "true", "windowMinutes": 60},
            headers=user.bearer,
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if check(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def test_a_v1_call_is_reported_by_model_with_its_token_kinds(system: Stack) -> None:
    with system.client("gateway") as gateway:
        admin = login(gateway, Account("", ADMIN_USERNAME, "admin-password-123", ""))
        user = register(gateway, "bymodel")
        for provider in ("openai", "qwen"):
            response = gateway.put(
                "/api/v1/tokens/quota",
                headers=admin.bearer,
                json={"userId": user.user_id, "provider": provider, "totalTokens": 100_000},
            )
            assert response.status_code == 200, response.text
        created = gateway.post(
            "/api/v1/auth/api-keys",
            headers=user.bearer,
            json={"userId": user.user_id, "name": "sdk"},
        )
        assert created.status_code == 201, created.text
        client = openai.OpenAI(
            base_url=system.url("gateway") + "/v1", api_key=created.json()["rawKey"]
        )
        plain = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=40)
        assert plain.usage is not None
        streamed_usage = None
        for chunk in client.chat.completions.create(
            model="qwen-turbo",
            messages=HELLO,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.usage is not None:
                streamed_usage = chunk.usage
        assert streamed_usage is not None
        consumed = gateway.post(
            "/api/v1/tokens/consume",
            headers=user.bearer,
            json={"userId": user.user_id, "provider": "openai", "tokens": 7},
        )
        assert consumed.status_code == 200, consumed.text

        def models(body: dict[str, Any]) -> dict[str | None, dict[str, Any]]:
            return {m["model"]: m for m in body["byModel"]}

        openai_report = _eventually_report(
            gateway, user, "openai", lambda b: {"gpt-4o-mini", None} <= models(b).keys()
        )
        mini = models(openai_report)["gpt-4o-mini"]
        assert mini["totalEvents"] == 1
        assert mini["promptTokens"] == plain.usage.prompt_tokens
        assert mini["completionTokens"] == plain.usage.completion_tokens
        assert mini["totalTokens"] == plain.usage.total_tokens
        assert mini["p50LatencyMs"] is not None
        consume = models(openai_report)[None]
        assert (consume["totalEvents"], consume["totalTokens"]) == (1, 7)
        qwen = models(_eventually_report(gateway, user, "qwen", lambda b: bool(b["byModel"])))
        assert qwen["qwen-turbo"]["promptTokens"] == streamed_usage.prompt_tokens
        assert qwen["qwen-turbo"]["completionTokens"] == streamed_usage.completion_tokens

        listed = gateway.get(
            "/api/v1/analytics/usage", params={"provider": "openai"}, headers=user.bearer
        )
        assert listed.status_code == 200, listed.text
        items = {item.get("model"): item for item in listed.json()["items"]}
        assert items["gpt-4o-mini"]["promptTokens"] == plain.usage.prompt_tokens
        assert "promptTokens" not in items[None]  # the /consume event keeps the plan's shape
