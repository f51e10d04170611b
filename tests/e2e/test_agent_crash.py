"""A session's budget goes back exactly once even when the system is not there to see the end
(a crash, then expiry while down) or a call is still in flight when the session ends (its
settlement lands in the ended session's pool and the sweeper returns it). Both shapes."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.agent_api import (
    available,
    consume_through,
    eventually,
    ok,
    open_session,
    recharge,
    register,
)
from tests.e2e.conftest import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _stack(stack_env: tuple[Path, dict[str, str], str], extra: dict[str, str]) -> Stack:
    workdir, env, shape = stack_env
    prefix = {"LEAKY_GATEWAY__RATE_LIMIT_KEY_PREFIX": f"lt:test:{uuid.uuid4().hex}:"}
    return Stack(workdir, {**env, **prefix, **extra}, shape)


def test_a_session_that_expires_while_the_system_is_down_is_returned_after_restart(
    stack_env: tuple[Path, dict[str, str], str],
) -> None:
    stack = _stack(stack_env, {})
    first = stack.up(name="agents-first")
    try:
        with stack.client("gateway") as gateway:
            agent = register(gateway)
            recharge(gateway, agent, 1000)
            session = open_session(gateway, agent, 400, lifetime=3)
            credential = session["proxy"]["api_key"]
            assert consume_through(gateway, agent, credential, 100).status_code == 200
    finally:
        first.kill()  # a crash: no shutdown, the session is still active in the database
    stack.up(name="agents-second")
    try:
        with stack.client("gateway") as gateway:
            expired = eventually(
                lambda: (
                    (
                        s := ok(
                            gateway.get(f"/v1/sessions/{session['session_id']}", headers=agent.key)
                        )
                    )
                    and s["status"] == "expired"
                    and s
                ),
                what="session expired after the restart",
            )
            assert expired["tokens_used"] == 100
            assert expired["tokens_returned"] == 300
            assert available(gateway, agent) == 900
            assert consume_through(gateway, agent, credential, 1).status_code == 401
    finally:
        stack.stop_all()


def test_a_call_in_flight_when_its_session_ends_is_charged_and_the_rest_goes_back(
    stack_env: tuple[Path, dict[str, str], str],
) -> None:
    # Slow streams: each chunk waits, so the session can end while one is being answered.
    stack = _stack(stack_env, {"LEAKY_STUBS__CHUNK_DELAY_MS": "250"})
    stack.up(name="agents-inflight")
    try:
        with stack.client("gateway") as gateway:
            agent = register(gateway)
            recharge(gateway, agent, 2000)
            budget = 500
            session = open_session(gateway, agent, budget, product="static-gpt-4o-mini")
            proxy = session["proxy"]
            pool = available(gateway, agent)
            started = threading.Event()
            outcome: dict[str, Any] = {}

            def stream() -> None:
                client = openai.OpenAI(base_url=proxy["full_url"], api_key="x", max_retries=0)
                try:
                    chunks = client.chat.completions.create(
                        model=proxy["model"],
                        messages=[{"role": "user", "content": "a slow answer, please"}],
                        max_tokens=40,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                    for chunk in chunks:
                        started.set()
                        if chunk.usage is not None:
                            outcome["usage"] = chunk.usage.total_tokens
                except Exception as exc:  # a cut stream is still settled; kept for the report
                    outcome["error"] = exc
                finally:
                    started.set()
                    client.close()

            worker = threading.Thread(target=stream)
            worker.start()
            assert started.wait(60)
            during = ok(gateway.get(f"/v1/sessions/{session['session_id']}", headers=agent.key))
            assert during["tokens_in_flight"] > 0, during  # the stream holds a reservation
            ok(gateway.post(f"/v1/sessions/{session['session_id']}/terminate", headers=agent.key))
            worker.join(120)
            assert not worker.is_alive()

            def settled() -> dict[str, Any] | None:
                s = ok(gateway.get(f"/v1/sessions/{session['session_id']}", headers=agent.key))
                done = s["tokens_in_flight"] == 0 and s["tokens_used"] + s["tokens_returned"]
                return s if done == budget else None

            final = eventually(settled, within=60, what="late tokens returned")
            assert final["status"] == "terminated"
            assert final["tokens_used"] > 0, outcome  # the stream was charged what it used
            if "usage" in outcome:
                assert final["tokens_used"] == outcome["usage"]
            assert available(gateway, agent) == pool + budget - final["tokens_used"]
    finally:
        stack.stop_all()
