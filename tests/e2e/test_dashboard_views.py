"""The dashboard's views in a real browser against a real `leaky-tokens up` (embedded shape; the
scoping and usage scenarios run on both shapes in test_dashboard_scoping.py): keys created and
revoked (the revoked key then fails at the API), a quota set by an ADMIN, a purchase started,
sign-in, sign-out and an expired session, keyboard use, axe-core on every view, a narrow
screen, and the files' own headers (a strict Content-Security-Policy)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
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
from tests.e2e.conftest import Stack, base_env
from tests.e2e.journeys import (
    ADMIN_PASSWORD,
    Account,
    assert_error,
    login,
    register,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.xdist_group("dashboard-views")]
__all__ = ["browser", "gateway"]  # fixtures, imported for this module

ADMIN_USERNAME = "dash_views_admin"
ALL_VIEWS = [
    ("Usage", "Usage over time", "#usage-totals"),
    ("Top users & orgs", "Top users and organisations", "#top-users"),
    ("Quotas", "Quotas", "#quota-table"),
    ("API keys", "API keys", "#key-table"),
    ("Purchases", "Purchases", "#purchase-table"),
    ("System", "System", "#upstream-table"),
]


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("dashboard-views")
    with dashboard_stack(workdir, base_env(workdir), "embedded", ADMIN_USERNAME) as running:
        yield running


@pytest.fixture(scope="module")
def admin(gateway: httpx.Client) -> Account:
    return login(gateway, Account("", ADMIN_USERNAME, ADMIN_PASSWORD, ""))


@pytest.fixture
def user(gateway: httpx.Client, admin: Account) -> Account:
    account = register(gateway, "viewer")
    response = gateway.put(
        "/api/v1/tokens/quota",
        headers=admin.bearer,
        json={"userId": account.user_id, "provider": "openai", "totalTokens": 10_000},
    )
    assert response.status_code == 200, response.text
    return account


@pytest.fixture
def tab(browser: Any, system: Stack) -> Iterator[Dashboard]:
    opened = open_dashboard(browser, system.url("gateway"), ARTEFACTS / "dashboard" / "views")
    yield opened
    opened.page.context.close()


def _expect() -> Any:
    from playwright.sync_api import expect

    return expect


# --- the files ----------------------------------------------------------------------------------


def test_the_gateway_serves_the_dashboard_with_a_strict_policy(gateway: httpx.Client) -> None:
    redirect = gateway.get("/dashboard")
    assert redirect.status_code == 308
    assert redirect.headers["location"] == "/dashboard/"
    page = gateway.get("/dashboard/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "default-src 'none'" in policy
    assert "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy
    assert "<script" in page.text
    assert "<script>" not in page.text  # no inline script: every script has a src
    assert page.headers["x-request-id"]
    chart = gateway.get("/dashboard/vendor/uPlot.esm.js")
    assert chart.status_code == 200
    assert chart.headers["content-type"].startswith("text/javascript")
    assert gateway.head("/dashboard/app.js").status_code == 200
    assert_error(gateway.get("/dashboard/nope.js"), 404, "NOT_FOUND")
    assert_error(gateway.get("/dashboard/%2e%2e/pyproject.toml"), 404, "NOT_FOUND")
    assert_error(gateway.post("/dashboard/", content=b"{}"), 405, "METHOD_NOT_ALLOWED")
    # the page is the gateway's own: no credentials asked, no upstream involved
    assert gateway.get("/dashboard/index.html").status_code == 200


# --- sessions -----------------------------------------------------------------------------------


def test_a_wrong_password_is_refused_without_saying_which_part(
    tab: Dashboard, user: Account
) -> None:
    expect = _expect()
    tab.open()
    tab.page.get_by_label("Username").fill(user.username)
    tab.page.get_by_label("Password").fill("not-the-password")
    tab.page.get_by_role("button", name="Sign in").click()
    expect(tab.page.get_by_role("alert")).to_have_text("Wrong username or password.")
    expect(tab.page.get_by_label("Password")).to_be_focused()
    tab.console.assert_clean(401)


def test_an_expired_session_sends_the_user_back_to_sign_in(tab: Dashboard, user: Account) -> None:
    expect = _expect()
    tab.sign_in(user.username, user.password)
    # The API starts answering 401 (as it does once the JWT's exp has passed).
    expired = {"message": "bearer token has expired", "code": "AUTH_EXPIRED_TOKEN"}
    tab.page.route(
        "**/api/v1/analytics/**",
        lambda route: route.fulfill(
            status=401, content_type="application/json", body=json.dumps(expired)
        ),
    )
    tab.page.get_by_role("heading", name="Sign in").wait_for(timeout=15_000)
    expect(tab.page.locator("#session-message")).to_have_text(
        "Your session has expired. Please sign in again."
    )
    expect(tab.page.get_by_role("navigation")).to_be_hidden()
    tab.page.unroute("**/api/v1/analytics/**")
    tab.sign_in(user.username, user.password)
    expect(tab.page.get_by_role("navigation")).to_be_visible()
    tab.console.assert_clean(401)


def test_the_session_ends_when_its_token_expires(tab: Dashboard, user: Account) -> None:
    expect = _expect()
    tab.page.clock.install()  # the page's timers and Date, moved by the test
    tab.sign_in(user.username, user.password)
    tab.page.clock.fast_forward(3_601_000)  # past the token's expiresIn (3600 s)
    tab.page.get_by_role("heading", name="Sign in").wait_for()
    expect(tab.page.locator("#session-message")).to_have_text(
        "Your session expired. Please sign in again."
    )
    tab.console.assert_clean()


def test_sign_out_forgets_the_session(tab: Dashboard, user: Account) -> None:
    expect = _expect()
    tab.sign_in(user.username, user.password)
    tab.page.get_by_role("button", name="Sign out").click()
    expect(tab.page.locator("#session-message")).to_have_text("You have signed out.")
    # nothing of the session is kept in the browser's storage
    stored = tab.page.evaluate(
        "() => [localStorage.length, sessionStorage.length, document.cookie]"
    )
    assert stored == [0, 0, ""]
    tab.console.assert_clean()


# --- keys, quotas, purchases --------------------------------------------------------------------


def test_a_key_is_shown_once_then_revoked_and_refused_by_the_api(
    tab: Dashboard, user: Account, gateway: httpx.Client
) -> None:
    expect = _expect()
    tab.page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    tab.sign_in(user.username, user.password)
    tab.go("API keys", "API keys")
    name = f"ci-{uuid.uuid4().hex[:6]}"
    tab.page.get_by_label("Key name").fill(name)
    tab.page.get_by_role("button", name="Create key").click()
    raw = tab.page.locator("#raw-key")
    expect(raw).to_contain_text(f"leaky_{user.user_id}_")
    raw_key = raw.inner_text().strip()
    tab.page.get_by_role("button", name="Copy key").click()
    expect(tab.page.get_by_text("Copied to the clipboard.")).to_be_visible()
    assert tab.page.evaluate("() => navigator.clipboard.readText()") == raw_key
    row = tab.page.locator("#key-table tbody tr", has_text=name)
    expect(row).to_contain_text("active")
    tab.screenshot("keys-created")
    assert gateway.get("/api/v1/auth/me", headers={"X-Api-Key": raw_key}).status_code == 200

    row.get_by_role("button", name=f"Revoke key {name}").click()
    row.get_by_role("button", name=f"Yes, revoke key {name}").click()
    expect(row).to_contain_text("revoked")
    # the listing never shows the raw key again
    tab.page.get_by_role("button", name="I have saved it").click()
    assert raw_key not in tab.page.inner_html("main")
    deadline = time.monotonic() + 3
    while True:
        answer = gateway.get("/api/v1/auth/me", headers={"X-Api-Key": raw_key})
        if answer.status_code == 401 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert_error(answer, 401, "AUTH_REVOKED_KEY")
    tab.console.assert_clean()


def test_an_admin_sets_a_quota_from_the_page(
    tab: Dashboard, user: Account, gateway: httpx.Client
) -> None:
    expect = _expect()
    tab.sign_in(ADMIN_USERNAME, ADMIN_PASSWORD)
    tab.go("Quotas", "Quotas")
    form = tab.page.get_by_role("form", name="Set a quota")
    form.get_by_label("Owner id").fill(user.user_id)
    form.get_by_label("Provider").select_option("qwen")
    form.get_by_label("Total tokens").fill("4242")
    form.get_by_label("Remaining tokens").fill("4000")
    form.get_by_role("button", name="Set quota").click()
    saved = "Saved: qwen pool of 4,242 tokens, 4,000 remaining."
    expect(tab.page.locator("main").get_by_text(saved)).to_be_visible()
    row = tab.page.locator("#quota-table tbody tr", has_text=user.user_id).filter(has_text="qwen")
    expect(row).to_contain_text("4,000 of 4,242 left")
    quota = gateway.get(
        "/api/v1/tokens/quota",
        params={"userId": user.user_id, "provider": "qwen"},
        headers=user.bearer,
    ).json()
    assert (quota["totalTokens"], quota["remainingTokens"]) == (4242, 4000)
    tab.screenshot("quota-set")
    # a USER sees the pool, but no form to change it
    other = open_dashboard(tab.page.context.browser, tab.base_url, tab.shot_dir)
    try:
        other.sign_in(user.username, user.password)
        other.go("Quotas", "Quotas")
        expect(other.page.locator("#quota-table tbody tr", has_text="qwen")).to_contain_text(
            "4,000 of 4,242 left"
        )
        expect(other.page.get_by_role("form", name="Set a quota")).to_have_count(0)
        other.console.assert_clean()
    finally:
        other.page.context.close()
    tab.console.assert_clean()


def test_a_purchase_started_from_the_page_completes_with_its_trail(
    tab: Dashboard, user: Account
) -> None:
    expect = _expect()
    tab.sign_in(user.username, user.password)
    tab.go("Purchases", "Purchases")
    form = tab.page.get_by_role("form", name="Buy tokens")
    form.get_by_label("Tokens").fill("750")
    form.get_by_role("button", name="Buy tokens").click()
    expect(tab.page.locator("main").get_by_text("started (STARTED)")).to_be_visible()
    row = tab.page.locator("#purchase-table tbody tr", has_text="750")
    expect(row).to_contain_text("COMPLETED", timeout=15_000)
    row.get_by_role("button", name="Show trail").click()
    trail = tab.page.locator("#purchase-trail tbody th")
    expect(trail).to_have_text(
        ["PurchaseStarted", "PaymentReserved", "TokensAllocated", "PurchaseCompleted"]
    )
    tab.console.assert_clean()


def test_usage_shows_each_provider_with_allowed_and_refused_requests(
    tab: Dashboard, user: Account, admin: Account, gateway: httpx.Client
) -> None:
    expect = _expect()
    for provider, total in (("qwen", 10_000), ("gemini", 150)):
        response = gateway.put(
            "/api/v1/tokens/quota",
            headers=admin.bearer,
            json={"userId": user.user_id, "provider": provider, "totalTokens": total},
        )
        assert response.status_code == 200, response.text

    def consume(provider: str, tokens: int, status: int) -> None:
        answer = gateway.post(
            "/api/v1/tokens/consume",
            headers=user.bearer,
            json={"userId": user.user_id, "provider": provider, "tokens": tokens},
        )
        assert answer.status_code == status, answer.text

    for _ in range(5):
        consume("openai", 100, 200)
    consume("openai", 700, 429)  # the leaky bucket (capacity 1000) refuses the burst
    for _ in range(3):
        consume("qwen", 200, 200)
    consume("gemini", 100, 200)
    consume("gemini", 100, 402)  # the pool has 50 left
    tab.sign_in(user.username, user.password)
    expected = {
        # provider: requests, allowed, refused, tokens (asked for), allowed tokens
        "openai": ["6", "5", "1", "1,200", "500"],
        "qwen": ["3", "3", "0", "600", "600"],
        "gemini": ["2", "1", "1", "200", "100"],
    }
    for provider, cells in expected.items():
        header = tab.page.locator(f"th:text-is('{provider}')")
        row = tab.page.locator("#usage-totals tbody tr", has=header)
        expect(row.locator("td.num")).to_have_text(cells, timeout=15_000)
    expect(tab.page.locator("#anomaly-list li.spike")).to_have_count(3)
    tab.page.wait_for_timeout(300)
    tab.screenshot("usage-providers")
    tab.console.assert_clean()


def test_usage_shows_per_model_figures_when_events_name_a_model(
    tab: Dashboard, user: Account, system: Stack
) -> None:
    """Usage events of /v1 calls (the usage-event contract's fields), pushed to analytics as the
    token service's relay pushes them: the per-model table appears with their token kinds and
    latency percentiles; a /consume-only window shows no such table (the other usage test)."""
    from datetime import UTC, datetime

    expect = _expect()
    token = (system.workdir / "var" / "internal_token").read_text().strip()
    now = datetime.now(UTC)
    events = []
    for i, (model, prompt, completion, latency) in enumerate(
        [("gpt-4o-mini", 12, 30, 200), ("gpt-4o-mini", 8, 20, 400), ("gpt-4o", 100, 50, 900)]
    ):
        event_id = str(uuid.uuid4())
        events.append(
            {
                "eventId": event_id,
                "stream": "usage",
                "type": "TokensConsumed",
                "aggregateId": user.user_id,
                "occurredAt": now.isoformat().replace("+00:00", "Z"),
                "payload": {
                    "eventId": event_id,
                    "type": "TokensConsumed",
                    "decision": "ALLOWED",
                    "allowed": True,
                    "userId": user.user_id,
                    "orgId": None,
                    "provider": "openai",
                    "tokens": prompt + completion,
                    "requestId": f"req_model_{i}",
                    "model": model,
                    "promptTokens": prompt,
                    "completionTokens": completion,
                    "estimated": False,
                    "latencyMs": latency,
                    "stream": False,
                    "reservedTokens": prompt + 64,
                },
            }
        )
    tab.sign_in(user.username, user.password)
    table = tab.page.locator("#usage-models")
    expect(tab.page.locator("#usage-totals td.empty")).to_be_visible(timeout=15_000)
    expect(table).to_be_hidden()  # nothing names a model yet
    with httpx.Client(base_url=system.url("analytics"), timeout=30) as analytics:
        pushed = analytics.post(
            "/api/v1/analytics/events",
            json={"events": events},
            headers={"X-Internal-Token": token},
        )
        assert pushed.status_code == 200, pushed.text
    expect(table).to_be_visible(timeout=20_000)  # the next refresh (every 5 s)
    mini = table.locator("tbody tr", has=tab.page.locator("td:text-is('gpt-4o-mini')"))
    # requests, prompt, completion, tokens, p50, p95 (nearest rank of 200 and 400 ms)
    expect(mini.locator("td.num")).to_have_text(["2", "20", "50", "70", "200", "400"])
    big = table.locator("tbody tr", has=tab.page.locator("td:text-is('gpt-4o')"))
    expect(big.locator("td.num")).to_have_text(["1", "100", "50", "150", "900", "900"])
    tab.screenshot("usage-models")
    tab.console.assert_clean()


# --- keyboard, accessibility, narrow screens ----------------------------------------------------


def test_the_dashboard_is_usable_by_keyboard_alone(tab: Dashboard, user: Account) -> None:
    expect = _expect()
    keyboard = tab.page.keyboard
    tab.open()
    expect(tab.page.get_by_label("Username")).to_be_focused()  # sign-in starts in the form
    keyboard.type(user.username)
    keyboard.press("Tab")
    expect(tab.page.get_by_label("Password")).to_be_focused()
    keyboard.type(user.password)
    keyboard.press("Enter")
    heading = tab.page.get_by_role("heading", name="Usage over time")
    expect(heading).to_be_focused()  # a new view moves focus to its heading
    # backwards from there: the views in order, the header's button, the skip link
    nav = tab.page.get_by_role("navigation")
    for name in ("Purchases", "API keys", "Quotas", "Top users & orgs", "Usage"):
        keyboard.press("Shift+Tab")
        expect(nav.get_by_role("link", name=name, exact=True)).to_be_focused()
    keyboard.press("Shift+Tab")
    expect(tab.page.get_by_role("button", name="Sign out")).to_be_focused()
    keyboard.press("Shift+Tab")
    expect(tab.page.get_by_role("link", name="Skip to content")).to_be_focused()
    keyboard.press("Enter")
    expect(tab.page.locator("main")).to_be_focused()
    # the first control of the view is the window picker, a radio group: arrows move in it
    keyboard.press("Tab")
    expect(tab.page.get_by_label("1 hour")).to_be_focused()
    keyboard.press("ArrowRight")
    expect(tab.page.get_by_label("24 hours")).to_be_checked()
    # back to the views and into API keys
    keyboard.press("Shift+Tab")
    keyboard.press("Shift+Tab")
    expect(nav.get_by_role("link", name="API keys")).to_be_focused()
    keyboard.press("Enter")
    expect(tab.page.get_by_role("heading", name="API keys", exact=True)).to_be_focused()
    expect(nav.get_by_role("link", name="API keys")).to_have_attribute("aria-current", "page")
    # create a key without the mouse: the copy button then takes the focus
    keyboard.press("Tab")
    expect(tab.page.get_by_label("Key name")).to_be_focused()
    keyboard.type("keyboard-key")
    keyboard.press("Enter")
    expect(tab.page.get_by_role("button", name="Copy key")).to_be_focused()
    tab.console.assert_clean()


def _tour_axe(tab: Dashboard, views: list[tuple[str, str, str]], role: str) -> dict[str, Any]:
    found = {}
    for link, heading, table in views:
        tab.go(link, heading)
        tab.page.locator(f"{table} tbody tr").first.wait_for()
        tab.page.wait_for_timeout(300)  # charts drawn, legends filled
        found[f"{role}:{link}"] = tab.axe_violations()
    return found


def test_axe_finds_no_serious_violation_on_any_view(
    tab: Dashboard, user: Account, gateway: httpx.Client
) -> None:
    gateway.post(
        "/api/v1/tokens/consume",
        headers=user.bearer,
        json={"userId": user.user_id, "provider": "openai", "tokens": 10},
    )
    tab.open()
    violations = {"sign-in": tab.axe_violations()}
    tab.sign_in(user.username, user.password)
    violations.update(_tour_axe(tab, ALL_VIEWS[:-1], "user"))
    tab.page.get_by_role("button", name="Sign out").click()
    tab.sign_in(ADMIN_USERNAME, ADMIN_PASSWORD)
    violations.update(_tour_axe(tab, ALL_VIEWS, "admin"))
    assert {view: found for view, found in violations.items() if found} == {}
    tab.console.assert_clean()


def test_every_view_fits_a_narrow_screen(browser: Any, system: Stack, user: Account) -> None:
    phone = open_dashboard(
        browser, system.url("gateway"), ARTEFACTS / "dashboard" / "narrow", width=375, height=740
    )
    try:
        phone.sign_in(ADMIN_USERNAME, ADMIN_PASSWORD)
        for link, heading, table in ALL_VIEWS:
            phone.go(link, heading)
            phone.page.locator(f"{table} tbody tr").first.wait_for()
            overflow = phone.page.evaluate(
                "() => document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 0, f"{link}: the page is {overflow}px wider than the screen"
            phone.screenshot(heading.split()[0].lower())
        phone.console.assert_clean()
    finally:
        phone.page.context.close()
