"""Composition root of a provider stub: the plan's routes plus the emulated real API.

* openai: the OpenAI API at `/v1` (chat completions, responses, embeddings, models);
* qwen: DashScope's OpenAI-compatible mode at `/compatible-mode/v1`;
* gemini: the native Gemini API at `/v1beta/models/...`.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from leaky_tokens.providers.emulation import ProviderApiError, provider_error_handler
from leaky_tokens.providers.faults import FaultInjector
from leaky_tokens.providers.gemini_api import PREFIXES as GEMINI_PREFIXES
from leaky_tokens.providers.gemini_api import GeminiEmulator, build_gemini_router
from leaky_tokens.providers.openai_api import Dialect, OpenAiEmulator, build_openai_router
from leaky_tokens.providers.router import DISPLAY_NAMES, build_router
from leaky_tokens.providers.schemas import ProviderName
from leaky_tokens.settings import StubSettings
from leaky_tokens.shared.app import Exposure, build_service_app
from leaky_tokens.shared.clock import Clock, SystemClock
from leaky_tokens.shared.tokenizer import preload

ENCODINGS: dict[ProviderName, tuple[str, ...]] = {
    "openai": ("o200k_base", "cl100k_base"),
    "qwen": ("qwen",),
    "gemini": ("o200k_base",),
}
EMULATED_API: dict[ProviderName, str] = {
    "openai": "the OpenAI API at /v1 (chat completions, responses, embeddings, models)",
    "qwen": "DashScope's OpenAI-compatible mode at /compatible-mode/v1 (chat completions, "
    "embeddings, models)",
    "gemini": "the Gemini API at /v1beta (and /v1) /models/{model}:generateContent, "
    ":streamGenerateContent, :countTokens, :embedContent and :batchEmbedContents",
}


def create_provider_app(
    provider: ProviderName,
    *,
    internal_token: str | None = None,
    settings: StubSettings | None = None,
    log_access: bool = True,
    rng: random.Random | None = None,
    clock: Clock | None = None,
    exposure: Exposure | None = None,
) -> FastAPI:
    """`internal_token` guards the fault controls; None: a random one nobody knows (read it
    back from `app.state.internal_token`). `exposure`: who reads /metrics and the docs."""
    if provider not in DISPLAY_NAMES:
        raise ValueError(f"unknown provider {provider!r}")
    settings = settings or StubSettings()
    clock = clock or SystemClock()
    token = internal_token or secrets.token_urlsafe(32)
    injector = FaultInjector(rng or random.Random(), provider=provider)
    emulated: list[APIRouter]
    not_found: ProviderApiError
    if provider == "gemini":
        gemini = GeminiEmulator(injector=injector, clock=clock, settings=settings)
        emulated = [build_gemini_router(gemini, prefix) for prefix in GEMINI_PREFIXES]
        prefixes = tuple(f"{prefix}/" for prefix in GEMINI_PREFIXES)
        not_found = gemini.error(404, "Requested entity was not found.", as_array=False)
    else:
        emulator = OpenAiEmulator(provider, injector=injector, clock=clock, settings=settings)
        emulated = [build_openai_router(emulator)]
        prefixes = (f"{emulator.dialect.prefix}/",)
        not_found = Dialect(provider).error(404, "Invalid URL", "invalid_request_error")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # The vocabularies load (about a second of CPU) before the stub reports itself started,
        # off the event loop: otherwise its first call would stall every other one meanwhile.
        await asyncio.to_thread(preload, *ENCODINGS[provider])
        yield

    app = build_service_app(
        f"{provider}-stub",
        title=f"{DISPLAY_NAMES[provider]} stub",
        description=(
            f"Emulates {EMULATED_API[provider]}, with deterministic replies and usage counted "
            "by the offline tokenizer, plus the plan's /api/v1/"
            f"{provider}/chat. Faults (429, 500, 503, hang, latency, cut or failing streams) "
            f"are set at run time through /api/v1/{provider}/faults with the internal token."
        ),
        routers=[
            build_router(provider, injector=injector, clock=clock, internal_token=token),
            *emulated,
        ],
        lifespan=lifespan,
        log_access=log_access,
        exposure=exposure,
    )
    app.state.internal_token = token
    app.add_exception_handler(ProviderApiError, provider_error_handler)
    plan_handler = app.exception_handlers[StarletteHTTPException]

    async def http_error(request: Request, exc: Exception) -> Response:
        # Unknown paths under the emulated API answer in the provider's shape, as the real
        # API does; everything else keeps our own error body.
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code in (404, 405) and request.url.path.startswith(prefixes):
            return not_found.response()
        response = plan_handler(request, exc)
        assert not isinstance(response, Response)
        answer = await response
        assert isinstance(answer, Response)
        return answer

    app.add_exception_handler(StarletteHTTPException, http_error)
    return app
