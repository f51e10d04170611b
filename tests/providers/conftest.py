"""Provider stubs served on loopback sockets, and the official SDKs pointed straight at them."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from leaky_tokens.providers import create_provider_app
from leaky_tokens.providers.schemas import ProviderName
from leaky_tokens.settings import StubSettings
from tests.live_server import serving

TOKEN = "stub-sdk-internal-token"
API_PATHS: dict[ProviderName, str] = {
    "openai": "/v1",
    "qwen": "/compatible-mode/v1",
    "gemini": "/v1beta",
}


@dataclass
class LiveStub:
    provider: ProviderName
    url: str
    control: httpx.AsyncClient  # carries the internal token, for the fault switch

    @property
    def api_url(self) -> str:
        return self.url + API_PATHS[self.provider]

    async def set_faults(self, **faults: Any) -> None:
        response = await self.control.put(f"/api/v1/{self.provider}/faults", json=faults)
        assert response.status_code == 200, response.text

    async def faults(self) -> dict[str, Any]:
        response = await self.control.get(f"/api/v1/{self.provider}/faults")
        body: dict[str, Any] = response.json()
        return body


@contextlib.asynccontextmanager
async def live_stub(provider: ProviderName, **settings: Any) -> AsyncIterator[LiveStub]:
    app = create_provider_app(
        provider,
        internal_token=TOKEN,
        settings=StubSettings(**settings),
        log_access=False,
        rng=random.Random(3),
    )
    async with serving(app, lifespan=True) as url:  # the lifespan loads the tokenizer
        async with httpx.AsyncClient(
            base_url=url, headers={"X-Internal-Token": TOKEN}, timeout=10
        ) as control:
            yield LiveStub(provider, url, control)


@pytest.fixture
async def openai_stub() -> AsyncIterator[LiveStub]:
    async with live_stub("openai") as stub:
        yield stub


@pytest.fixture
async def qwen_stub() -> AsyncIterator[LiveStub]:
    async with live_stub("qwen") as stub:
        yield stub


@pytest.fixture
async def gemini_stub() -> AsyncIterator[LiveStub]:
    async with live_stub("gemini") as stub:
        yield stub
