"""A token service killed mid-saga finishes every saga on restart, each step exactly once.

The token service runs as its own process (`serve tokens` on a port fixed in advance) beside the
rest (`up --skip tokens`), so it can die alone. A fault hook installed by the test launcher
`tests/e2e/crashing_tokens.py` ends it with exit code 137, as SIGKILL would, right after it
commits the named saga event: the saga's
row, its outbox and its pool are then exactly as a crash there leaves them. The test reads that
state from the database, restarts the service without the hook (same port, same database), and
checks the saga ends, its outbox trail names each step once, and the pool changed once or not
at all. A short lease lets the new process take over the dead one's saga within a second.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from leaky_tokens.shared.clock import SystemClock
from leaky_tokens.shared.database import Database
from leaky_tokens.shared.migrations import upgrade_database
from leaky_tokens.tokens.flags import FeatureFlags
from leaky_tokens.tokens.models import OutboxEvent, PurchaseSaga, StubPaymentOperation
from tests.e2e.conftest import REPO_ROOT, Process, Stack, free_ports
from tests.e2e.crashing_tokens import CRASH_AFTER
from tests.e2e.journeys import Account, login, register
from tests.e2e.test_purchase_scenarios import (
    FAILURE_TRAIL,
    SUCCESS_TRAIL,
    accepted,
    pool,
    purchase,
    set_quota,
    trail,
    wait_for_end,
)

pytestmark = pytest.mark.e2e

ADMIN_USERNAME = "e2e_crash_admin"
ADMIN_PASSWORD = "admin-password-123"
QUOTA = 1000
TOKENS = 500
CRASH_TIMEOUT = 20.0
# after a restart: the dead process's lease (1 s) runs out, then the saga's remaining steps
RECOVERY_TIMEOUT = 20.0


@dataclass(frozen=True)
class Saga:
    """What the database holds for one saga (read while no token service runs)."""

    status: str
    events: list[str]
    payments: list[str]


class CrashStack:
    """Auth in `up --skip tokens,...`; the token service in processes of its own, one at a time."""

    def __init__(self, stack: Stack, tokens_port: int, tokens_env: dict[str, str]) -> None:
        self.stack, self.port, self.tokens_env = stack, tokens_port, tokens_env
        self.url = f"http://127.0.0.1:{tokens_port}"

    def start_tokens(
        self,
        name: str,
        *,
        crash_after: str = "",
        flags: dict[str, bool] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> Process:
        env = {
            **self.tokens_env,
            **(extra_env or {}),
            CRASH_AFTER: crash_after,
            "PYTHONPATH": str(REPO_ROOT),
        }
        if flags is not None:
            # as an ADMIN would have set them (settings only seed flags never set)
            asyncio.run(_set_flags(self.database_url(), flags))
        args = ["serve", "tokens", "--port", str(self.port)]
        process = Process(
            args, env, self.stack.workdir, name, module="tests.e2e.crashing_tokens"
        ).start()
        self.stack.processes.append(process)
        return process

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0)

    def database_url(self) -> str:
        return self.tokens_env.get("LEAKY_TOKENS__DATABASE_URL") or (
            f"sqlite+aiosqlite:///{(self.stack.workdir / 'var' / 'tokens.db').as_posix()}"
        )

    def saga_on_disk(self, key: str) -> Saga:
        return asyncio.run(_read_saga(self.database_url(), key))


async def _set_flags(url: str, flags: dict[str, bool]) -> None:
    await upgrade_database(url, "tokens")
    database = Database(url)
    try:
        for name, enabled in flags.items():
            await FeatureFlags(database, SystemClock()).set(name, enabled)
    finally:
        await database.dispose()


async def _read_saga(url: str, key: str) -> Saga:
    """The saga's row, its outbox events and the payment stub's ledger, straight from the
    token database (through the service's own table models)."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            saga_id, status = (
                await connection.execute(
                    select(PurchaseSaga.id, PurchaseSaga.status).where(
                        PurchaseSaga.idempotency_key == key
                    )
                )
            ).one()
            events = await connection.scalars(
                select(OutboxEvent.event_type)
                .where(OutboxEvent.stream == "purchase", OutboxEvent.aggregate_id == str(saga_id))
                .order_by(OutboxEvent.id)
            )
            payments = await connection.scalars(
                select(StubPaymentOperation.step)
                .where(StubPaymentOperation.saga_id == saga_id)
                .order_by(StubPaymentOperation.created_at)
            )
            return Saga(status, list(events), list(payments))
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
def crash_stack(stack_env: tuple[Path, dict[str, str], str]) -> Iterator[CrashStack]:
    workdir, env, shape = stack_env
    running = Stack(workdir, env, shape)
    (tokens_port,) = free_ports(1)
    try:
        rest = running.up(
            "--skip",
            "tokens,gateway,analytics,qwen,gemini,openai",
            extra_env={
                "LEAKY_ADMIN_USERNAME": ADMIN_USERNAME,
                "LEAKY_ADMIN_PASSWORD": ADMIN_PASSWORD,
                # where the others find the token service started apart
                "LEAKY_PORTS__TOKENS": str(tokens_port),
            },
        )
        tokens_env = {
            **env,
            "LEAKY_URLS__AUTH": f"http://127.0.0.1:{rest.ports['auth']}",
            "LEAKY_TOKENS__SAGA_LEASE_SECONDS": "1",
            "LEAKY_TOKENS__SAGA_POLL_INTERVAL_SECONDS": "0.1",
            "LEAKY_TOKENS__SAGA_RETRY_BASE_SECONDS": "0.05",
        }
        yield CrashStack(running, tokens_port, tokens_env)
    finally:
        running.stop_all()


@pytest.fixture(scope="module")
def auth(crash_stack: CrashStack) -> Iterator[httpx.Client]:
    with crash_stack.stack.client("auth") as client:
        yield client


@pytest.fixture(scope="module")
def admin(auth: httpx.Client) -> Account:
    return login(auth, Account("", ADMIN_USERNAME, ADMIN_PASSWORD, ""))


@pytest.fixture
def user(auth: httpx.Client) -> Account:
    return register(auth)


def start_purchase_and_crash(
    crash_stack: CrashStack,
    admin: Account,
    user: Account,
    key: str,
    crash_after: str,
    flags: dict[str, bool],
) -> str | None:
    """Start a purchase on a token service that dies after `crash_after`; its saga id, or None
    when the process died before it could answer (the saga was committed before the answer)."""
    hooked = crash_stack.start_tokens(
        f"tokens-crash-{crash_after}-{key}", crash_after=crash_after, flags=flags
    )
    try:
        with crash_stack.client() as tokens:
            set_quota(tokens, admin, user, total=QUOTA, remaining=QUOTA)
            try:
                started = accepted(purchase(tokens, user, key, amount=TOKENS))
            except httpx.TransportError:
                started = None
        assert hooked.proc is not None
        try:
            code = hooked.proc.wait(CRASH_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"no crash after {crash_after} in {CRASH_TIMEOUT}s:\n{hooked.log_tail()}")
        assert code == 137, hooked.log_tail()
    finally:
        hooked.kill()
    return started["sagaId"] if started else None


# crash point, saga.simulate-failure, the status the crash leaves, the final trail
CRASH_POINTS = [
    ("PaymentReserved", False, "PAYMENT_RESERVED", SUCCESS_TRAIL),
    ("TokensAllocated", False, "TOKENS_ALLOCATED", SUCCESS_TRAIL),
    ("PurchaseCompleted", False, "COMPLETED", SUCCESS_TRAIL),
    ("PaymentReserved", True, "PAYMENT_RESERVED", FAILURE_TRAIL),
    ("PurchaseCompensating", True, "COMPENSATING", FAILURE_TRAIL),
    ("PaymentReleased", True, "COMPENSATING", FAILURE_TRAIL),
]


@pytest.mark.parametrize(
    ("crash_after", "failing", "status_at_crash", "final_trail"),
    CRASH_POINTS,
    ids=[
        f"{point}-{'failing' if failing else 'succeeding'}" for point, failing, *_ in CRASH_POINTS
    ],
)
def test_a_saga_finishes_after_a_crash(
    crash_stack: CrashStack,
    admin: Account,
    user: Account,
    crash_after: str,
    failing: bool,
    status_at_crash: str,
    final_trail: list[tuple[str, str]],
) -> None:
    key = f"crash-{uuid.uuid4().hex[:12]}"
    # set at start-up and kept in the database, so the restarted process sees the same flag
    flags = {"saga.simulate-failure": failing, "payment.unavailable": False}
    saga_id = start_purchase_and_crash(crash_stack, admin, user, key, crash_after, flags)

    types = [event for event, _ in final_trail]
    at_crash = crash_stack.saga_on_disk(key)
    assert at_crash.status == status_at_crash
    assert at_crash.events == types[: types.index(crash_after) + 1]

    restarted = crash_stack.start_tokens(f"tokens-after-{crash_after}-{key}")
    try:
        with crash_stack.client() as tokens:
            saga = wait_for_end(tokens, user, key, timeout=RECOVERY_TIMEOUT)
            assert saga["id"] == (saga_id or saga["id"])
            assert trail(tokens, user, key) == final_trail
            if failing:
                assert saga["status"] == "FAILED"
                assert "simulate" in saga["failureReason"]
                assert pool(tokens, user) == (QUOTA, QUOTA)
            else:
                assert saga["status"] == "COMPLETED"
                assert pool(tokens, user) == (QUOTA + TOKENS, QUOTA + TOKENS)
    finally:
        restarted.stop()
    # each payment call happened once (the stub's ledger is keyed by saga and step)
    final = crash_stack.saga_on_disk(key)
    assert final.payments == (["reserve", "release"] if failing else ["reserve", "capture"])
    assert final.events == types


def test_a_saga_compensates_its_allocation_across_two_crashes(
    crash_stack: CrashStack, admin: Account, user: Account
) -> None:
    """Allocated, then the payment provider stays down at capture: the saga gives up, takes the
    tokens back (crash right after), and releases the payment once the provider answers."""
    key = f"crash-{uuid.uuid4().hex[:12]}"
    flags = {"saga.simulate-failure": False, "payment.unavailable": False}
    saga_id = start_purchase_and_crash(crash_stack, admin, user, key, "TokensAllocated", flags)
    assert crash_stack.saga_on_disk(key).status == "TOKENS_ALLOCATED"

    # capture fails until the saga gives up (attempts are quick here) and compensates
    down = crash_stack.start_tokens(
        f"tokens-down-{key}",
        crash_after="TokensDeallocated",
        flags={"payment.unavailable": True},
        extra_env={"LEAKY_TOKENS__SAGA_MAX_ATTEMPTS": "2"},
    )
    assert down.proc is not None
    try:
        code = down.proc.wait(CRASH_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no crash after TokensDeallocated:\n{down.log_tail()}")
    finally:
        down.kill()
    assert code == 137, down.log_tail()
    at_crash = crash_stack.saga_on_disk(key)
    assert at_crash.status == "COMPENSATING"
    assert at_crash.events == [
        "PurchaseStarted",
        "PaymentReserved",
        "TokensAllocated",
        "PurchaseCompensating",
        "TokensDeallocated",
    ]
    assert at_crash.payments == ["reserve"]

    restarted = crash_stack.start_tokens(f"tokens-up-{key}", flags={"payment.unavailable": False})
    try:
        with crash_stack.client() as tokens:
            saga = wait_for_end(tokens, user, key, timeout=RECOVERY_TIMEOUT)
            assert saga["id"] == (saga_id or saga["id"])
            assert saga["status"] == "FAILED"
            assert saga["failureReason"] == "gave up after 2 attempts: payment provider unavailable"
            assert trail(tokens, user, key) == [
                ("PurchaseStarted", "STARTED"),
                ("PaymentReserved", "PAYMENT_RESERVED"),
                ("TokensAllocated", "TOKENS_ALLOCATED"),
                ("PurchaseCompensating", "COMPENSATING"),
                ("TokensDeallocated", "COMPENSATING"),
                ("PaymentReleased", "COMPENSATING"),
                ("PurchaseFailed", "FAILED"),
            ]
            assert pool(tokens, user) == (QUOTA, QUOTA)
    finally:
        restarted.stop()
    assert crash_stack.saga_on_disk(key).payments == ["reserve", "release"]


def test_a_saga_killed_before_its_first_step_completes_on_restart(
    crash_stack: CrashStack, admin: Account, user: Account
) -> None:
    """A real SIGKILL while the payment provider is down: the saga, still STARTED, is picked
    up by the next process and completes once."""
    key = f"kill-{uuid.uuid4().hex[:12]}"
    down = crash_stack.start_tokens(
        f"tokens-killed-{key}",
        flags={"saga.simulate-failure": False, "payment.unavailable": True},
        extra_env={"LEAKY_TOKENS__SAGA_MAX_ATTEMPTS": "100"},
    )
    try:
        with crash_stack.client() as tokens:
            set_quota(tokens, admin, user, total=QUOTA, remaining=QUOTA)
            started = accepted(purchase(tokens, user, key, amount=TOKENS))
            time.sleep(0.3)  # a few reservations fail meanwhile
            assert (
                tokens.get(f"/api/v1/tokens/purchase/{key}", headers=user.bearer).json()["status"]
                == "STARTED"
            )
    finally:
        down.kill()
    assert down.proc is not None
    assert down.proc.returncode == -signal.SIGKILL
    assert crash_stack.saga_on_disk(key) == Saga("STARTED", ["PurchaseStarted"], [])

    restarted = crash_stack.start_tokens(
        f"tokens-revived-{key}", flags={"payment.unavailable": False}
    )
    try:
        with crash_stack.client() as tokens:
            saga = wait_for_end(tokens, user, key, timeout=RECOVERY_TIMEOUT)
            assert (saga["id"], saga["status"]) == (started["sagaId"], "COMPLETED")
            assert trail(tokens, user, key) == SUCCESS_TRAIL
            assert pool(tokens, user) == (QUOTA + TOKENS, QUOTA + TOKENS)
    finally:
        restarted.stop()
    assert crash_stack.saga_on_disk(key).payments == ["reserve", "capture"]
