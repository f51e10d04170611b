"""Headless Chromium for the dashboard's browser tests: Debian's /usr/bin/chromium driven by
Playwright (never `playwright install`), the vendored axe-core, console capture, screenshots.

Without a browser the tests skip with the reason; under LEAKY_TEST_REQUIRE_SERVERS=1 (CI) they
fail instead (`.ci/run` installs Debian's chromium when it is missing).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.backends import REQUIRE_SERVERS
from tests.e2e.conftest import Stack
from tests.e2e.journeys import admin_env

CHROMIUM = os.environ.get("LEAKY_TEST_CHROMIUM", "/usr/bin/chromium")
# What this closed network needs: no background connections (they are refused, many at a time)
# and no sandbox (the tests run as root).
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
]
ROOT = Path(__file__).resolve().parents[2]
ARTEFACTS = Path(os.environ.get("LEAKY_TEST_ARTEFACTS", ROOT / "var" / "test-artefacts"))
AXE_SOURCE = Path(__file__).with_name("vendor") / "axe.min.js"
# Chrome reports a failed fetch (4xx/5xx) on the console; a test that expects one says so.
NETWORK_ERROR = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")


# The dashboard refreshes a view every 5 s (4 calls on the usage view), and the tests' own calls
# share the user's window at the gateway.
GATEWAY_LIMIT = {"LEAKY_GATEWAY__RATE_LIMIT_REQUESTS": "1000"}


@contextmanager
def dashboard_stack(workdir: Path, env: dict[str, str], shape: str, admin: str) -> Iterator[Stack]:
    """`leaky-tokens up` with this ADMIN bootstrapped, for a module of browser tests."""
    running = Stack(workdir, env, shape)
    running.up(extra_env={**admin_env(admin), **GATEWAY_LIMIT}, name=f"dashboard-{shape}")
    try:
        yield running
    finally:
        running.stop_all()


@pytest.fixture(scope="module")
def gateway(system: Stack) -> Iterator[httpx.Client]:
    with system.client("gateway") as client:
        yield client


def need_browser() -> None:
    reason = None
    if not os.access(CHROMIUM, os.X_OK):
        reason = f"Chromium not found at {CHROMIUM} (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "playwright (PyPI) is not installed"
    if reason:
        if REQUIRE_SERVERS:
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(system: Any) -> Iterator[Any]:
    """One Chromium per module and stack. It follows the module's `system` so that it is closed
    before that stack's shape changes: Playwright's sync API holds an event loop on this thread
    while the browser is open, and the stack fixtures call asyncio.run()."""
    need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Console:
    """Everything a page said on its console that was an error, and its uncaught exceptions."""

    errors: list[str] = field(default_factory=list)

    def watch(self, page: Any) -> None:
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def assert_clean(self, *expected_statuses: int) -> None:
        """No console error, except failed requests with one of `expected_statuses`."""
        unexpected = []
        for text in self.errors:
            found = NETWORK_ERROR.search(text)
            if found and int(found.group(1)) in expected_statuses:
                continue
            unexpected.append(text)
        assert unexpected == [], unexpected


@dataclass
class Dashboard:
    """One browser tab on the dashboard of a running stack."""

    page: Any
    base_url: str
    console: Console
    shot_dir: Path

    def open(self) -> None:
        self.page.goto(f"{self.base_url}/dashboard/")
        self.page.get_by_role("heading", name="Sign in").wait_for()

    def sign_in(self, username: str, password: str) -> None:
        self.open()
        self.page.get_by_label("Username").fill(username)
        self.page.get_by_label("Password").fill(password)
        self.page.get_by_role("button", name="Sign in").click()
        self.page.get_by_role("heading", name="Usage over time").wait_for()

    def go(self, link: str, heading: str) -> None:
        self.page.get_by_role("navigation").get_by_role("link", name=link).click()
        self.page.get_by_role("heading", name=heading, exact=True).wait_for()

    def main_text(self) -> str:
        return str(self.page.inner_text("main"))

    def screenshot(self, name: str) -> Path:
        self.shot_dir.mkdir(parents=True, exist_ok=True)
        path = self.shot_dir / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def axe_violations(self) -> list[dict[str, Any]]:
        """axe-core's serious and critical violations on the page as it is now (WCAG 2.x A/AA
        and best practices). Evaluated through the DevTools protocol, which the page's CSP does
        not govern, so the page itself keeps its strict policy."""
        if not self.page.evaluate("() => typeof window.axe !== 'undefined'"):
            self.page.evaluate(AXE_SOURCE.read_text())
        result = self.page.evaluate(
            """async () => {
                const r = await axe.run(document, {
                    runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa',
                                                     'best-practice']},
                    resultTypes: ['violations'],
                });
                return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                    nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 5)}));
            }"""
        )
        return [v for v in result if v["impact"] in ("serious", "critical")]


def open_dashboard(
    browser: Any, base_url: str, shot_dir: Path, *, width: int = 1280, height: int = 900
) -> Dashboard:
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(20_000)
    console = Console()
    console.watch(page)
    return Dashboard(page, base_url, console, shot_dir)
