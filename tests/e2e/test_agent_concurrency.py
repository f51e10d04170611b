"""TS-4 concurrency, in both shapes: concurrent session creations sharing idempotency keys make
one session per key and never a 5xx; creations racing for one pool fund exactly as many
sessions as it covers; concurrent spending through one session never passes its budget; and
concurrent terminations give what is left back exactly once."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.agent_api import (
    agent_stack,
    available,
    failed,
    ok,
    open_session,
    page,
    recharge,
    register,
)
from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def system(stack_env: tuple[Path, dict[str, str], str]) -> Iterator[Stack]:
    with agent_stack(stack_env) as running:
        yield running


@pytest.fixture(scope="module")
def gateway(system: Stack) -> Iterator[httpx.Client]:
    with system.client("gateway") as client:
        yield client


async def _all_at_once(
    base_url: str, requests: list[tuple[str, str, dict[str, str], Any]]
) -> list[httpx.Response]:
    async with httpx.AsyncClient(
        base_url=base_url, timeout=60.0, limits=httpx.Limits(max_connections=len(requests))
    ) as client:
        return list(
            await asyncio.gather(
                *(client.request(m, p, headers=h, json=b) for m, p, h, b in requests)
            )
        )


def test_ten_concurrent_creations_sharing_keys_make_one_session_per_key(
    gateway: httpx.Client,
) -> None:
    agent = register(gateway)
    recharge(gateway, agent, 1000)
    keys = ["k0", "k0", "k0", "k1", "k1", "k1", "k2", "k2", "k3", "k4"]
    prefix = uuid.uuid4().hex[:8]
    body = {"product_no": "dynamic-chat", "token_budget": 100}
    answers = asyncio.run(
        _all_at_once(
            str(gateway.base_url),
            [
                ("POST", "/v1/sessions", {**agent.key, "Idempotency-Key": f"{prefix}-{k}"}, body)
                for k in keys
            ],
        )
    )

    assert all(a.status_code < 500 for a in answers), [a.text for a in answers]
    sessions_of: dict[str, set[str]] = {}
    for key, answer in zip(keys, answers, strict=True):
        data = ok(answer, answer.status_code)
        assert answer.status_code in (200, 201)
        assert data["status"] == "active", data
        sessions_of.setdefault(key, set()).add(data["session_id"])
    assert all(len(ids) == 1 for ids in sessions_of.values()), sessions_of
    assert Counter(a.status_code for a in answers)[201] >= 1
    items, pagination = page(gateway.get("/v1/sessions", headers=agent.key))
    assert pagination["total"] == 5
    assert {s["session_id"] for s in items} == set().union(*sessions_of.values())
    assert available(gateway, agent) == 1000 - 5 * 100  # each budget moved once


def test_creations_racing_for_one_pool_fund_only_what_it_covers(gateway: httpx.Client) -> None:
    agent = register(gateway)
    recharge(gateway, agent, 1000)
    body = {"product_no": "dynamic-chat", "token_budget": 300}
    answers = asyncio.run(
        _all_at_once(
            str(gateway.base_url),
            [
                ("POST", "/v1/sessions", {**agent.key, "Idempotency-Key": uuid.uuid4().hex}, body)
                for _ in range(10)
            ],
        )
    )
    assert all(a.status_code < 500 for a in answers), [a.text for a in answers]
    funded = [a for a in answers if a.status_code == 201]
    refused = [a for a in answers if a.status_code != 201]
    assert len(funded) == 3
    for answer in refused:
        failed(answer, 402, "INSUFFICIENT_BALANCE")
    assert available(gateway, agent) == 100


def test_concurrent_spending_through_one_session_never_passes_its_budget(
    gateway: httpx.Client,
) -> None:
    agent = register(gateway)
    recharge(gateway, agent, 2000)
    budget, each, calls = 600, 30, 50
    session = open_session(gateway, agent, budget)
    credential = session["proxy"]["api_key"]
    pool_before = available(gateway, agent)
    consume = {"userId": agent.agent_id, "provider": "openai", "tokens": each, "prompt": "hi"}
    answers = asyncio.run(
        _all_at_once(
            str(gateway.base_url),
            [
                ("POST", "/api/v1/tokens/consume", {"X-API-Key": credential}, consume)
                for _ in range(calls)
            ],
        )
    )
    statuses = Counter(a.status_code for a in answers)
    assert set(statuses) <= {200, 402, 429}, statuses  # allowed, budget spent, bucket full
    charged = statuses[200] * each
    assert 0 < charged <= budget, statuses
    after = ok(gateway.get(f"/v1/sessions/{session['session_id']}", headers=agent.key))
    assert after["tokens_in_flight"] == 0
    assert after["tokens_used"] == charged
    assert after["budget_remaining"] == budget - charged
    assert available(gateway, agent) == pool_before  # the pool paid nothing more


def test_concurrent_terminations_give_the_rest_back_exactly_once(gateway: httpx.Client) -> None:
    agent = register(gateway)
    recharge(gateway, agent, 1000)
    session = open_session(gateway, agent, 400)
    spent = gateway.post(
        "/api/v1/tokens/consume",
        headers={"X-API-Key": session["proxy"]["api_key"]},
        json={"userId": agent.agent_id, "provider": "openai", "tokens": 100, "prompt": "hi"},
    )
    assert spent.status_code == 200, spent.text
    path = f"/v1/sessions/{session['session_id']}/terminate"
    answers = asyncio.run(
        _all_at_once(str(gateway.base_url), [("POST", path, agent.key, None) for _ in range(5)])
    )
    for answer in answers:
        assert ok(answer)["status"] == "terminated"
    final = ok(gateway.get(f"/v1/sessions/{session['session_id']}", headers=agent.key))
    assert final["tokens_returned"] == 300
    assert final["tokens_used"] == 100
    assert available(gateway, agent) == 1000 - 100


def test_fifty_concurrent_streams_in_one_session_never_spend_past_its_budget(
    gateway: httpx.Client,
) -> None:
    agent = register(gateway)
    recharge(gateway, agent, 10_000)
    budget = 900  # about a third of what 50 streams of up to ~60 tokens would take
    session = open_session(gateway, agent, budget, product="static-gpt-4o-mini")
    proxy = session["proxy"]
    pool = available(gateway, agent)

    async def one(client: openai.AsyncOpenAI, i: int) -> int | str:
        try:
            stream = await client.chat.completions.create(
                model=proxy["model"],
                messages=[{"role": "user", "content": f"stream number {i}, please"}],
                max_tokens=40,
                stream=True,
                stream_options={"include_usage": True},
            )
            usage = 0
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage.total_tokens
            return usage
        except openai.RateLimitError as exc:  # budget spent (insufficient_quota) or bucket full
            return f"429:{exc.code}"
        except openai.InternalServerError as exc:
            # The gateway could not reach the token service in time (a loaded machine): a clear
            # error, nothing charged; the budget's invariants below hold whatever the mix.
            if exc.status_code != 503:
                raise
            return "503"

    async def all_streams() -> list[int | str]:
        async with openai.AsyncOpenAI(
            base_url=proxy["full_url"], api_key="unused", max_retries=0, timeout=120
        ) as client:
            return list(await asyncio.gather(*(one(client, i) for i in range(50))))

    outcomes = asyncio.run(all_streams())
    served = [o for o in outcomes if isinstance(o, int)]
    refused = [o for o in outcomes if isinstance(o, str)]
    assert served, outcomes
    assert any(o.startswith("429") for o in refused), outcomes  # the budget ran out
    assert all(o > 0 for o in served), outcomes
    after = ok(gateway.get(f"/v1/sessions/{session['session_id']}", headers=agent.key))
    assert after["tokens_in_flight"] == 0
    assert after["tokens_used"] == sum(served) <= budget
    assert after["budget_remaining"] == budget - sum(served)
    assert available(gateway, agent) == pool
