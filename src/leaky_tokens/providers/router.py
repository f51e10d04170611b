"""HTTP endpoints of one provider stub: chat, fault control and health."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Response, status

from leaky_tokens.providers.faults import FaultInjector
from leaky_tokens.providers.schemas import (
    ChatRead,
    FaultsRead,
    FaultsUpdate,
    HealthRead,
    ProviderName,
    UsageRead,
)
from leaky_tokens.providers.usage import count_prompt_tokens, count_tokens
from leaky_tokens.shared.clock import Clock, utc_iso

DISPLAY_NAMES: dict[ProviderName, str] = {"qwen": "Qwen", "gemini": "Gemini", "openai": "OpenAI"}

_ERROR = {"description": "Error body: message, timestamp, code, requestId"}

ChatBody = Annotated[
    dict[str, Any],
    Body(
        description="Any JSON object: OpenAI-style messages, Gemini-style contents, or a prompt",
        examples=[
            {"model": "gpt-4", "messages": [{"role": "user", "content": "Hello"}]},
            {"contents": [{"parts": [{"text": "Hello"}]}]},
            {"prompt": "Hello"},
        ],
    ),
]


def compose_reply(provider: ProviderName, body: dict[str, Any], now: datetime) -> ChatRead:
    message = f"Stubbed {DISPLAY_NAMES[provider]} response"
    prompt_tokens = count_prompt_tokens(body)
    completion_tokens = count_tokens(message)
    return ChatRead(
        id=f"{provider}-{uuid.uuid4()}",
        provider=provider,
        received=body,
        created=utc_iso(now),
        message=message,
        usage=UsageRead(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
    )


def build_router(provider: ProviderName, *, injector: FaultInjector, clock: Clock) -> APIRouter:
    """Routes under /api/v1/{provider}; other providers' paths are simply not there (404)."""
    router = APIRouter(prefix=f"/api/v1/{provider}", tags=[f"{provider}-stub"])

    @router.post(
        "/chat",
        summary="Answer a chat request with a canned reply",
        responses={
            400: _ERROR,
            500: {"description": "Simulated failure (code PROVIDER_ERROR)"},
            503: {"description": "Provider marked down (code SERVICE_UNAVAILABLE)"},
        },
    )
    async def chat(body: ChatBody) -> ChatRead:
        await injector.apply()
        return compose_reply(provider, body, clock.now())

    @router.get("/faults", summary="The faults currently injected into chat calls")
    async def read_faults() -> FaultsRead:
        return FaultsRead.of(injector.faults)

    @router.put(
        "/faults",
        summary="Replace the faults injected into chat calls",
        responses={400: _ERROR},
    )
    async def replace_faults(update: FaultsUpdate) -> FaultsRead:
        return FaultsRead.of(injector.set_faults(update.to_faults()))

    @router.delete(
        "/faults",
        summary="Stop injecting faults",
        status_code=status.HTTP_204_NO_CONTENT,
        response_class=Response,
    )
    async def clear_faults() -> Response:
        injector.clear_faults()
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @router.get("/health", summary="Liveness of the stub process")
    async def health() -> HealthRead:
        return HealthRead(service=f"{provider}-stub")

    return router
