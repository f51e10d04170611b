"""Who reads /metrics and the API docs, on one setting for every service (issue 10: "/metrics,
/docs and /health are open to anyone who can reach a service port")."""

from __future__ import annotations

import contextlib
from pathlib import Path

import httpx
import pytest

from leaky_tokens.runtime.compose import build_app
from leaky_tokens.settings import SERVICES, Settings
from leaky_tokens.shared.events import resolve_internal_token

REMOTE = ("203.0.113.9", 40000)
LOOPBACK = ("127.0.0.1", 40000)
DOC_PATHS = ("/docs", "/redoc", "/openapi.json")


async def _get(app: object, path: str, peer: tuple[str, int], token: str | None = None) -> int:
    headers = {"X-Internal-Token": token} if token is not None else {}
    transport = httpx.ASGITransport(app=app, client=peer)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
        return (await client.get(path, headers=headers)).status_code


def _settings(tmp_path: Path, **exposure: str) -> Settings:
    return Settings(data_dir=tmp_path, access_log=False, **exposure)  # type: ignore[arg-type]


@pytest.mark.parametrize("service", SERVICES)
async def test_internal_means_the_internal_token_at_every_service(
    service: str, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, metrics_exposure="internal", docs_exposure="internal")
    token = resolve_internal_token("", tmp_path)
    app = build_app(service, settings)

    for path in ("/metrics", *DOC_PATHS):
        assert await _get(app, path, LOOPBACK) == 401, path  # loopback is not enough
        assert await _get(app, path, REMOTE, "wrong") == 401, path
        assert await _get(app, path, REMOTE, token) == 200, path


@pytest.mark.parametrize("service", SERVICES)
async def test_off_serves_neither(service: str, tmp_path: Path) -> None:
    app = build_app(service, _settings(tmp_path, metrics_exposure="off", docs_exposure="off"))
    token = resolve_internal_token("", tmp_path)

    # The gateway sends paths it does not serve itself to its edge, which needs its lifespan.
    async with contextlib.AsyncExitStack() as stack:
        if service == "gateway":
            await stack.enter_async_context(app.router.lifespan_context(app))
        for path in ("/metrics", *DOC_PATHS):
            assert await _get(app, path, LOOPBACK, token) == 404, path


async def test_local_by_default_loopback_reads_and_others_need_the_token(tmp_path: Path) -> None:
    app = build_app("tokens", _settings(tmp_path))
    token = resolve_internal_token("", tmp_path)

    for path in ("/metrics", "/openapi.json"):
        assert await _get(app, path, LOOPBACK) == 200, path
        assert await _get(app, path, REMOTE) == 401, path
        assert await _get(app, path, REMOTE, token) == 200, path


async def test_open_is_open_and_health_stays_open(tmp_path: Path) -> None:
    app = build_app("auth", _settings(tmp_path, metrics_exposure="open", docs_exposure="open"))
    guarded = build_app("auth", _settings(tmp_path, metrics_exposure="internal"))

    assert await _get(app, "/metrics", REMOTE) == 200
    assert await _get(app, "/docs", REMOTE) == 200
    # /health answers without a token whatever the exposure (its database check needs the
    # lifespan, not run here: any answer but 401 shows it was not guarded)
    assert await _get(guarded, "/api/v1/auth/health", REMOTE) != 401
