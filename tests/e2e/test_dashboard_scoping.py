"""The dashboard in a real browser against a real `leaky-tokens up`, on both shapes (embedded:
SQLite + HTTP push; distributed: PostgreSQL + Redis): sign-in as a USER and as an ADMIN, usage
appearing within seconds of consumes, a spike flagged on the chart, and a USER never seeing
another user's data in any view."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.browser import (
    ARTEFACTS,
    Dashboard,
    browser,
    dashboard_stack,
    gateway,
    open_dashboard,
)
from tests.e2e.conftest import Stack
from tests.e2e.journeys import ADMIN_PASSWORD, Account, login, register

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.xdist_group("dashboard-scoping")]
__all__ = ["browser", "gateway"]  # fixtures, imported for this module

ADMIN_USERNAME = "dash_scope_admin"
SEEN_WITHIN_MS = 15_000


@pytest.fixture(scope="module")
def system(stack_env: tuple[Path, dict[str, str], str]) -> Iterator[Stack]:
    with dashboard_stack(*stack_env, ADMIN_USERNAME) as running:
        yield running


@dataclass
class Person:
    account: Account
    key_name: str
    saga_id: str
    org_id: str | None = None


@dataclass
class World:
    admin: Account
    alice: Person
    bob: Person


def _ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json() if response.content else None


def set_quota(
    gateway: httpx.Client, admin: Account, body: dict[str, Any], org: bool = False
) -> None:
    path = "/api/v1/tokens/quota/org" if org else "/api/v1/tokens/quota"
    _ok(gateway.put(path, headers=admin.bearer, json={"provider": "openai", **body}))


def consume(gateway: httpx.Client, who: Account, tokens: int, org_id: str | None = None) -> None:
    body: dict[str, Any] = {"userId": who.user_id, "provider": "openai", "tokens": tokens}
    if org_id:
        body["orgId"] = org_id
    _ok(gateway.post("/api/v1/tokens/consume", headers=who.bearer, json=body))


def person(gateway: httpx.Client, admin: Account, prefix: str, *, with_org: bool) -> Person:
    account = register(gateway, prefix)
    set_quota(gateway, admin, {"userId": account.user_id, "totalTokens": 1_000_000})
    org_id = None
    if with_org:
        org = _ok(
            gateway.post(
                "/api/v1/auth/orgs", headers=account.bearer, json={"name": f"org-{prefix}"}
            ),
            201,
        )
        org_id = org["orgId"]
        set_quota(gateway, admin, {"orgId": org_id, "totalTokens": 500_000}, org=True)
        login(gateway, account)  # the JWT names the orgs it was issued with
    key_name = f"{prefix}-key-{uuid.uuid4().hex[:6]}"
    _ok(
        gateway.post("/api/v1/auth/api-keys", headers=account.bearer, json={"name": key_name}),
        201,
    )
    saga = _ok(
        gateway.post(
            "/api/v1/tokens/purchase",
            headers={**account.bearer, "Idempotency-Key": f"buy-{prefix}"},
            json={"userId": account.user_id, "provider": "openai", "tokens": 300},
        ),
        202,
    )
    return Person(account, key_name, saga["sagaId"], org_id)


@pytest.fixture(scope="module")
def world(gateway: httpx.Client) -> World:
    admin = login(gateway, Account("", ADMIN_USERNAME, ADMIN_PASSWORD, ""))
    alice = person(gateway, admin, f"alice{uuid.uuid4().hex[:4]}", with_org=False)
    bob = person(gateway, admin, f"bob{uuid.uuid4().hex[:4]}", with_org=True)
    for _ in range(3):
        consume(gateway, bob.account, 70)
    for _ in range(2):
        consume(gateway, bob.account, 40, org_id=bob.org_id)
    return World(admin, alice, bob)


@pytest.fixture
def tabs(browser: Any, system: Stack, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Opens dashboard tabs; each is closed after the test, its console checked by the test."""
    opened: list[Dashboard] = []
    shots = ARTEFACTS / "dashboard" / system.shape

    def open_tab(**size: int) -> Dashboard:
        tab = open_dashboard(browser, system.url("gateway"), shots, **size)
        opened.append(tab)
        return tab

    yield open_tab
    for tab in opened:
        tab.page.context.close()


def totals_row(tab: Dashboard, provider: str = "openai") -> Any:
    return tab.page.locator(
        "#usage-totals tbody tr", has=tab.page.locator(f"th:text-is('{provider}')")
    )


def test_a_user_signs_in_and_sees_usage_within_seconds_of_consumes(
    tabs: Any, gateway: httpx.Client, world: World
) -> None:
    from playwright.sync_api import expect

    alice = world.alice.account
    tab = tabs()
    tab.sign_in(alice.username, alice.password)
    expect(tab.page.get_by_text(f"{alice.username} (USER)")).to_be_visible()
    expect(tab.page.locator("#usage-totals td.empty")).to_have_text("No usage in this window.")
    consume(gateway, alice, 25)
    consume(gateway, alice, 35)
    # tokens column: the live refresh shows both consumes, counted exactly
    row = totals_row(tab)
    expect(row.locator("td").nth(4)).to_have_text("60", timeout=SEEN_WITHIN_MS)
    expect(row.locator("td").nth(1)).to_have_text("2")  # requests
    tab.screenshot("usage-user")
    tab.console.assert_clean()


def test_a_spike_is_flagged_and_marked_on_the_chart(tabs: Any, world: World) -> None:
    from playwright.sync_api import expect

    bob = world.bob.account
    tab = tabs()
    tab.sign_in(bob.username, bob.password)
    # 290 tokens in the last 5 minutes against an empty baseline: at least 2x -> a spike
    spike = tab.page.locator("#anomaly-list li.spike[data-provider='openai']")
    expect(spike).to_contain_text("Spike on openai", timeout=SEEN_WITHIN_MS)
    expect(spike).to_contain_text("290 tokens in the last 5 min")
    expect(tab.page.locator("#anomaly-list li[data-provider='qwen']")).to_contain_text(
        "qwen: no spike"
    )
    chart = tab.page.locator(".chart[data-spikes]").first
    expect(chart).to_have_attribute("data-spikes", "openai")
    tab.screenshot("usage-spike")
    tab.console.assert_clean()


# (link, heading, the table whose first row says the view has its data, screenshot name)
VIEWS = [
    ("Usage", "Usage over time", "#usage-totals", "usage"),
    ("Top users & orgs", "Top users and organisations", "#top-users", "top"),
    ("Quotas", "Quotas", "#quota-table", "quotas"),
    ("API keys", "API keys", "#key-table", "keys"),
    ("Purchases", "Purchases", "#purchase-table", "purchases"),
]


def tour(tab: Dashboard, role: str) -> dict[str, str]:
    """Visit every view, wait for its data, return each view's whole HTML (attributes too)."""
    seen = {}
    for link, heading, table, name in VIEWS:
        tab.go(link, heading)
        tab.page.locator(f"{table} tbody tr").first.wait_for()
        if link == "Purchases":
            tab.page.get_by_role("button", name="Show trail").first.click()
            tab.page.locator("#purchase-trail table tbody th").first.wait_for()
        seen[link] = str(tab.page.inner_html("main"))
        tab.screenshot(f"{name}-{role}")
    return seen


def test_a_user_never_sees_another_users_data_in_any_view(tabs: Any, world: World) -> None:
    from playwright.sync_api import expect

    alice, bob = world.alice, world.bob
    tab = tabs()
    tab.sign_in(alice.account.username, alice.account.password)
    seen = tour(tab, "user")
    foreign = {
        "bob's user id": bob.account.user_id,
        "bob's username": bob.account.username,
        "bob's key": bob.key_name,
        "bob's saga": bob.saga_id,
        "bob's org": str(bob.org_id),
    }
    for view, html in seen.items():
        for what, value in foreign.items():
            assert value not in html, f"{what} shown in {view}"
    # and what is hers is there
    assert alice.key_name in seen["API keys"]
    assert alice.saga_id in seen["Purchases"]
    assert f"{alice.account.user_id} (you)" in seen["Quotas"]
    # no System view for a USER, and its address says so without asking the API
    nav = tab.page.get_by_role("navigation")
    expect(nav.get_by_role("link", name="System")).to_have_count(0)
    tab.page.evaluate("() => { window.location.hash = '#/system'; }")
    expect(tab.page.get_by_text("This view is for ADMINs.")).to_be_visible()
    tab.console.assert_clean()


def test_an_admin_sees_everyones_data_and_the_system_view(
    tabs: Any, world: World, system: Stack
) -> None:
    from playwright.sync_api import expect

    tab = tabs()
    tab.sign_in(ADMIN_USERNAME, ADMIN_PASSWORD)
    expect(tab.page.get_by_text(f"{ADMIN_USERNAME} (ADMIN)")).to_be_visible()
    seen = tour(tab, "admin")
    bob = world.bob
    assert bob.account.user_id in seen["Top users & orgs"]
    assert str(bob.org_id) in seen["Top users & orgs"]
    assert bob.account.user_id in seen["Quotas"]
    assert str(bob.org_id) in seen["Quotas"]
    assert bob.saga_id in seen["Purchases"]
    assert world.alice.saga_id in seen["Purchases"]
    tab.go("System", "System")
    upstreams = tab.page.locator("#upstream-table tbody tr")
    expect(upstreams).to_have_count(6)
    expect(tab.page.locator("#upstream-table tbody tr", has_text="tokens")).to_contain_text("UP")
    expect(tab.page.locator("#pipeline-table")).to_contain_text("Outbox backlog")
    transports = "http, redis" if system.shape == "distributed" else "http"
    expect(tab.page.locator("#pipeline-table")).to_contain_text(f"Consumer lag ({transports})")
    tab.screenshot("system-admin")
    tab.console.assert_clean()
