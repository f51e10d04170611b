"""Composition root of a provider stub: one FastAPI app per emulated provider."""

from __future__ import annotations

import random

from fastapi import FastAPI

from leaky_tokens.providers.faults import FaultInjector
from leaky_tokens.providers.router import DISPLAY_NAMES, build_router
from leaky_tokens.providers.schemas import ProviderName
from leaky_tokens.shared.app import build_service_app
from leaky_tokens.shared.clock import Clock, SystemClock


def create_provider_app(
    provider: ProviderName,
    *,
    log_access: bool = True,
    rng: random.Random | None = None,
    clock: Clock | None = None,
) -> FastAPI:
    if provider not in DISPLAY_NAMES:
        raise ValueError(f"unknown provider {provider!r}")
    injector = FaultInjector(rng or random.Random(), provider=provider)
    return build_service_app(
        f"{provider}-stub",
        title=f"{DISPLAY_NAMES[provider]} stub",
        description=(
            f"Emulates the {DISPLAY_NAMES[provider]} chat API with canned replies and "
            "deterministic token usage. Faults (down, failure rate, latency) are set at run "
            f"time through /api/v1/{provider}/faults."
        ),
        routers=[build_router(provider, injector=injector, clock=clock or SystemClock())],
        log_access=log_access,
    )
