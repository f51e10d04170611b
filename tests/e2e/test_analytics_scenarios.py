"""Plan §6.1-6.3 against a real `leaky-tokens up` (embedded: SQLite + HTTP push; distributed:
PostgreSQL + Redis Streams), and the pipeline's exactly-once effect across killed processes.

Events reach analytics asynchronously (outbox -> relay -> transport), so each test polls the
analytics answer until it shows what the consumes wrote (the plan sleeps 5 s instead). §6.3's
baseline ("baseline usage pattern established") is written into earlier windows through the
internal ingestion endpoint with the stack's internal token: a baseline lives in past windows,
and waiting for real windows to pass would take hours.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.backends import create_postgres_database, drop_postgres_database
from tests.e2e.conftest import Stack, base_env, free_ports
from tests.e2e.journeys import ADMIN_PASSWORD, ERROR_FIELDS, Account, admin_env, login, register

pytestmark = pytest.mark.e2e

ADMIN_USERNAME = "e2e_analytics_admin"
ITEM_FIELDS = {"key", "userId", "tokens", "allowed", "decision", "eventId", "orgId", "requestId"}


@pytest.fixture(scope="module")
def system(stack_env: tuple[Path, dict[str, str], str]) -> Iterator[Stack]:
    workdir, env, shape = stack_env
    running = Stack(workdir, env, shape)
    running.up(
        extra_env=admin_env(ADMIN_USERNAME),
        name="analytics-up",
    )
    try:
        yield running
    finally:
        running.stop_all()


@pytest.fixture(scope="module")
def analytics(system: Stack) -> Iterator[httpx.Client]:
    with system.client("analytics") as client:
        yield client


@pytest.fixture(scope="module")
def admin(auth: httpx.Client) -> Account:
    return login(auth, Account("", ADMIN_USERNAME, ADMIN_PASSWORD, ""))


@pytest.fixture
def user(auth: httpx.Client, tokens: httpx.Client, admin: Account) -> Account:
    account = register(auth)
    set_quota(tokens, admin, account.user_id, 1_000_000)
    return account


def set_quota(tokens: httpx.Client, admin: Account, user_id: str, total: int) -> None:
    response = tokens.put(
        "/api/v1/tokens/quota",
        headers=admin.bearer,
        json={"userId": user_id, "provider": "openai", "totalTokens": total},
    )
    assert response.status_code == 200, response.text


def consume(tokens: httpx.Client, account: Account, amount: int, prompt: str) -> httpx.Response:
    return tokens.post(
        "/api/v1/tokens/consume",
        headers=account.bearer,
        json={"userId": account.user_id, "provider": "openai", "tokens": amount, "prompt": prompt},
    )


def poll(
    analytics: httpx.Client,
    path: str,
    account: Account,
    done: Any,
    within: float = 20.0,
    **params: Any,
) -> dict[str, Any]:
    """GET the analytics answer until `done(body)` holds (events arrive asynchronously)."""
    deadline = time.monotonic() + within
    while True:
        response = analytics.get(f"/api/v1/analytics/{path}", params=params, headers=account.bearer)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if done(body):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never got there; last answer: {body}")
        time.sleep(0.1)


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body.keys() >= ERROR_FIELDS
    assert body["code"] == code


def test_scenario_6_1_usage_tracking(
    tokens: httpx.Client, analytics: httpx.Client, user: Account
) -> None:
    for i in range(1, 6):
        assert consume(tokens, user, 20, f"Analytics test {i}").status_code == 200

    body = poll(analytics, "usage", user, lambda b: b["count"] == 5, provider="openai", limit=10)

    assert body["provider"] == "openai"
    assert len(body["items"]) == 5
    for item in body["items"]:
        assert item.keys() == ITEM_FIELDS
        assert item["key"]["provider"] == "openai"
        datetime.fromisoformat(item["key"]["timestamp"])
        assert item["userId"] == user.user_id
        assert (item["tokens"], item["allowed"]) == (20, True)
    stamps = [datetime.fromisoformat(i["key"]["timestamp"]) for i in body["items"]]
    assert stamps == sorted(stamps, reverse=True)  # newest first


def test_scenario_6_2_usage_report_generation(
    tokens: httpx.Client, analytics: httpx.Client, admin: Account, user: Account
) -> None:
    set_quota(tokens, admin, user.user_id, 100)
    statuses = [consume(tokens, user, 20, f"Report test {i}").status_code for i in range(7)]
    assert statuses == [200] * 5 + [402] * 2

    report = poll(
        analytics,
        "report",
        user,
        lambda b: b["totalEvents"] == 7,
        provider="openai",
        windowMinutes=60,
    )

    assert report["provider"] == "openai"
    start = datetime.fromisoformat(report["windowStart"])
    end = datetime.fromisoformat(report["windowEnd"])
    assert end - start == timedelta(minutes=60)
    assert (report["allowedEvents"], report["deniedEvents"]) == (5, 2)
    assert (report["totalTokens"], report["allowedTokens"]) == (140, 100)
    assert report["averageTokens"] == 20.0
    assert report["uniqueUsers"] == 1
    assert isinstance(report["sampleLimit"], int)
    assert report["topUsers"] == [
        {"userId": user.user_id, "totalTokens": 140, "events": 7, "allowedTokens": 100}
    ]
    # An ADMIN sees everyone's usage and may narrow it to this user.
    everyone = analytics.get(
        "/api/v1/analytics/report", params={"provider": "openai"}, headers=admin.bearer
    ).json()
    assert everyone["totalEvents"] >= 7
    narrowed = analytics.get(
        "/api/v1/analytics/report",
        params={"provider": "openai", "userId": user.user_id},
        headers=admin.bearer,
    ).json()
    assert (narrowed["totalEvents"], narrowed["totalTokens"]) == (7, 140)


def test_scenario_6_3_anomaly_detection(
    system: Stack, tokens: httpx.Client, analytics: httpx.Client, user: Account
) -> None:
    # baseline: 150 tokens in each of the three 10-minute windows before the current one
    now = datetime.now(UTC)
    baseline = [
        usage_event(user.user_id, 50, now - timedelta(minutes=10 * k + 4, seconds=s))
        for k in (1, 2, 3)
        for s in (0, 20, 40)
    ]
    ingest(system, baseline)

    calm = poll(
        analytics,
        "anomalies",
        user,
        lambda b: b["baselineAverage"] == 150.0,
        provider="openai",
        windowMinutes=10,
    )
    assert (calm["currentTokens"], calm["anomaly"]) == (0, False)

    responses = asyncio.run(spike(system.url("tokens"), user, 100))
    assert {r.status_code for r in responses} <= {200, 429}

    body = poll(
        analytics,
        "anomalies",
        user,
        lambda b: b["currentTokens"] == 5000,
        provider="openai",
        windowMinutes=10,
    )
    start = datetime.fromisoformat(body["currentWindowStart"])
    end = datetime.fromisoformat(body["currentWindowEnd"])
    assert end - start == timedelta(minutes=10)
    assert body["baselineWindows"] == 3
    assert body["baselineAverage"] == 150.0
    assert body["ratio"] == 33.33
    assert body["threshold"] == 2.0
    assert body["anomaly"] is True
    assert isinstance(body["sampleLimit"], int)


def test_a_user_sees_only_their_own_usage(
    auth: httpx.Client, tokens: httpx.Client, analytics: httpx.Client, user: Account
) -> None:
    assert consume(tokens, user, 20, "mine").status_code == 200
    poll(analytics, "usage", user, lambda b: b["count"] == 1, provider="openai")
    other = register(auth)
    theirs = analytics.get(
        "/api/v1/analytics/usage", params={"provider": "openai"}, headers=other.bearer
    ).json()
    assert theirs["count"] == 0
    snooping = analytics.get(
        "/api/v1/analytics/usage",
        params={"provider": "openai", "userId": user.user_id},
        headers=other.bearer,
    )
    assert_error(snooping, 403, "FORBIDDEN")


def test_bad_questions_are_400s(analytics: httpx.Client, user: Account) -> None:
    for params in (
        {"provider": "claude"},
        {"provider": "openai", "limit": 201},
        {"provider": "openai", "windowMinutes": 0},
        {"provider": "openai", "threshold": 0.5},
        {"provider": "openai", "baselineWindows": 25},
    ):
        path = "usage" if "limit" in params else "anomalies"
        response = analytics.get(f"/api/v1/analytics/{path}", params=params, headers=user.bearer)
        assert_error(response, 400, "INVALID_REQUEST")


def test_lag_is_observable(tokens: httpx.Client, analytics: httpx.Client) -> None:
    tokens_metrics = tokens.get("/metrics").text
    assert "tokens_outbox_backlog_events" in tokens_metrics
    assert "tokens_outbox_oldest_unpublished_age_seconds" in tokens_metrics
    analytics_metrics = analytics.get("/metrics").text
    assert "analytics_event_delay_seconds_count" in analytics_metrics
    assert "analytics_consumer_lag_events" in analytics_metrics


# the pipeline across killed processes


def test_every_usage_event_is_stored_once_across_killed_processes(
    stack_env: tuple[Path, dict[str, str], str], tmp_path: Path
) -> None:
    """The token service (with its relay) is killed with SIGKILL and analytics too, while
    consumes keep coming; afterwards analytics holds exactly the outbox's usage events."""
    _, module_env, shape = stack_env
    ports = dict(zip(("auth", "tokens", "analytics"), free_ports(3), strict=True))
    env = {
        **base_env(tmp_path),
        **{f"LEAKY_PORTS__{name.upper()}": str(port) for name, port in ports.items()},
        "LEAKY_EVENTS__RECLAIM_IDLE_SECONDS": "1",
        "LEAKY_EVENTS__RELAY_BATCH_SIZE": "20",
    }
    databases: list[str] = []
    if shape == "distributed":  # its own databases and streams, apart from the module's stack
        for service in ("auth", "tokens", "analytics"):
            url = asyncio.run(create_postgres_database(f"kill_{service}"))
            databases.append(url)
            env[f"LEAKY_{service.upper()}__DATABASE_URL"] = url
        env["REDIS_URL"] = module_env["REDIS_URL"]
        env["LEAKY_EVENTS__STREAM_PREFIX"] = f"lt:test:kill:{uuid.uuid4().hex}:"
    stack = Stack(tmp_path, env, shape)
    skip = ("--skip", "gateway,analytics,qwen,gemini")
    load: Load | None = None
    try:
        core = stack.up(*skip, name="core-1")
        analytics_proc = stack.serve("analytics", ports["analytics"], name="analytics-1")
        with stack.client("auth") as auth:
            account = register(auth)
        set_quota_cli(tmp_path, env, account.user_id)
        load = Load(f"http://127.0.0.1:{ports['tokens']}", account)
        load.start()
        load.wait_for(40)
        analytics_proc.stop(signal.SIGKILL)  # analytics dies mid-stream
        load.wait_for(40)
        analytics_proc = stack.serve("analytics", ports["analytics"], name="analytics-2")
        load.wait_for(40)
        core.stop(signal.SIGKILL)  # the relay dies with the token service, mid-batch or not
        time.sleep(0.3)
        core = stack.up(*skip, name="core-2")
        load.wait_for(40)
        load.stop()

        deadline = time.monotonic() + 60
        while True:
            wanted = outbox_usage(tmp_path, env, account.user_id)
            stored = stored_usage(stack, account)
            if stored["ids"] == wanted["ids"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(stored["items"]) == len(stored["ids"]), "an event is stored twice"
        assert stored["ids"] == wanted["ids"]
        assert stored["tokens"] == wanted["tokens"]
        assert len(wanted["ids"]) >= 160
    finally:
        if load is not None:
            load.stop()
        stack.stop_all()
        for url in databases:
            asyncio.run(drop_postgres_database(url))


class Load:
    """Consumes in a thread, steadily, riding out the token service's restart."""

    def __init__(self, tokens_url: str, account: Account) -> None:
        self.url, self.account = tokens_url, account
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while not self._stop.is_set():
                try:
                    consume(client, self.account, 5, "pipeline")
                    self.answered += 1
                except httpx.HTTPError:
                    time.sleep(0.05)

    def wait_for(self, more: int, within: float = 60.0) -> None:
        target = self.answered + more
        deadline = time.monotonic() + within
        while self.answered < target:
            assert time.monotonic() < deadline, "the load stalled"
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def set_quota_cli(workdir: Path, env: dict[str, str], user_id: str) -> None:
    """`leaky-tokens admin set-quota`: writes the tokens database directly, no ADMIN needed."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "leaky_tokens.cli",
            "admin",
            "set-quota",
            "--user-id",
            user_id,
            "--provider",
            "openai",
            "--total",
            "100000000",
        ],
        env=env,
        cwd=workdir,
        check=True,
        capture_output=True,
        timeout=60,
    )


def outbox_usage(workdir: Path, env: dict[str, str], user_id: str) -> dict[str, Any]:
    """The usage events the token service wrote for this user, read from its database."""
    url = env.get("LEAKY_TOKENS__DATABASE_URL")
    query = "SELECT event_id, payload FROM token_outbox WHERE stream = 'usage' AND aggregate_id = "
    if url is None:
        with sqlite3.connect(workdir / "var" / "tokens.db") as conn:
            rows = conn.execute(query + "?", (user_id,)).fetchall()
    else:
        rows = asyncio.run(_pg_rows(url, query + "$1", user_id))
    ids = {str(uuid.UUID(str(r[0]))) for r in rows}
    tokens = sum(
        json.loads(r[1])["tokens"] if isinstance(r[1], str) else r[1]["tokens"] for r in rows
    )
    return {"ids": ids, "tokens": tokens}


async def _pg_rows(url: str, query: str, user_id: str) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return list(await conn.fetch(query, user_id))
    finally:
        await conn.close()


def stored_usage(stack: Stack, account: Account) -> dict[str, Any]:
    """Every usage event analytics holds for this user, paged through /usage."""
    items: list[dict[str, Any]] = []
    with stack.client("analytics") as analytics:
        page = 1
        while True:
            response = analytics.get(
                "/api/v1/analytics/usage",
                params={"provider": "openai", "limit": 200, "page": page},
                headers=account.bearer,
            )
            assert response.status_code == 200, response.text
            body = response.json()
            items.extend(body["items"])
            if page >= body["pagination"]["total_pages"]:
                break
            page += 1
    return {
        "items": items,
        "ids": {i["eventId"] for i in items},
        "tokens": sum(i["tokens"] for i in items),
    }


def usage_event(user_id: str, tokens: int, at: datetime) -> dict[str, Any]:
    event_id = str(uuid.uuid4())
    stamp = at.isoformat().replace("+00:00", "Z")
    return {
        "eventId": event_id,
        "stream": "usage",
        "type": "TokensConsumed",
        "aggregateId": user_id,
        "occurredAt": stamp,
        "payload": {
            "eventId": event_id,
            "type": "TokensConsumed",
            "decision": "ALLOWED",
            "allowed": True,
            "userId": user_id,
            "orgId": None,
            "provider": "openai",
            "tokens": tokens,
            "occurredAt": stamp,
            "requestId": None,
        },
    }


def ingest(stack: Stack, events: list[dict[str, Any]]) -> None:
    with stack.client("analytics") as analytics:
        response = analytics.post(
            "/api/v1/analytics/events",
            json={"events": events},
            headers={"X-Internal-Token": stack.internal_token()},
        )
    assert response.status_code == 200, response.text


async def spike(base_url: str, account: Account, requests: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
    async with httpx.AsyncClient(base_url=base_url, timeout=60.0, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post(
                    "/api/v1/tokens/consume",
                    headers=account.bearer,
                    json={
                        "userId": account.user_id,
                        "provider": "openai",
                        "tokens": 50,
                        "prompt": "Spike test",
                    },
                )
                for _ in range(requests)
            )
        )
