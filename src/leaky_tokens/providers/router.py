"""The plan's endpoints of one provider stub: chat (scenario 7.1), fault control and health.

Fault control needs the internal token (X-Internal-Token): whoever can reach a stub must not be
able to break it for every tenant."""

from __future__ import annotations

import hmac
import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request, Response, status

from leaky_tokens.providers.emulation import admit
from leaky_tokens.providers.faults import FaultInjector, plan_error
from leaky_tokens.providers.schemas import (
    ChatRead,
    FaultsRead,
    FaultsUpdate,
    HealthRead,
    ProviderName,
    UsageRead,
)
from leaky_tokens.providers.usage import count_prompt_tokens
from leaky_tokens.shared.clock import Clock, utc_iso
from leaky_tokens.shared.events import INTERNAL_TOKEN_HEADER, InvalidInternalToken
from leaky_tokens.shared.tokenizer import count_text

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
    prompt_tokens = count_prompt_tokens(provider, body)
    completion_tokens = count_text(provider, "", message)
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


def build_router(
    provider: ProviderName, *, injector: FaultInjector, clock: Clock, internal_token: str
) -> APIRouter:
    """Routes under /api/v1/{provider}; other providers' paths are simply not there (404)."""
    router = APIRouter(prefix=f"/api/v1/{provider}", tags=[f"{provider}-stub"])
    expected = internal_token.encode()

    def internal_only(request: Request) -> None:
        offered = request.headers.get(INTERNAL_TOKEN_HEADER)
        if offered is None or not hmac.compare_digest(offered.encode(), expected):
            raise InvalidInternalToken()

    internal = [Depends(internal_only)]
    _401: dict[int | str, dict[str, Any]] = {
        401: {"description": f"Missing or wrong {INTERNAL_TOKEN_HEADER}"}
    }

    @router.post(
        "/chat",
        summary="Answer a chat request with a canned reply",
        responses={
            400: _ERROR,
            429: {"description": "Simulated rate limit (code RATE_LIMITED, Retry-After)"},
            500: {"description": "Simulated failure (code PROVIDER_ERROR)"},
            503: {"description": "Provider marked down (code SERVICE_UNAVAILABLE)"},
        },
    )
    async def chat(request: Request, body: ChatBody) -> ChatRead:
        await admit(injector, request, plan_error)
        return compose_reply(provider, body, clock.now())

    @router.get(
        "/faults",
        summary="The faults currently injected into calls (internal token)",
        dependencies=internal,
        responses=_401,
    )
    async def read_faults() -> FaultsRead:
        return FaultsRead.of(injector.faults)

    @router.put(
        "/faults",
        summary="Replace the faults injected into calls (internal token)",
        dependencies=internal,
        responses={400: _ERROR, **_401},
    )
    async def replace_faults(update: FaultsUpdate) -> FaultsRead:
        return FaultsRead.of(injector.set_faults(update.to_faults()))

    @router.delete(
        "/faults",
        summary="Stop injecting faults (internal token)",
        status_code=status.HTTP_204_NO_CONTENT,
        response_class=Response,
        dependencies=internal,
        responses=_401,
    )
    async def clear_faults() -> Response:
        injector.clear_faults()
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @router.get("/health", summary="Liveness of the stub process")
    async def health() -> HealthRead:
        return HealthRead(service=f"{provider}-stub")

    return router
