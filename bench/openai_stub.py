"""The one OpenAI-format stub process every compared system calls (`python -m bench.openai_stub`).

It is `leaky-tokens serve openai` (the same CLI, settings and server), with one thing added
while our OpenAI stub has no `POST /v1/chat/completions` of its own (the provider emulators are
being written): a FastAPI route beside its routes in OpenAI's chat completion wire format, plain
and streamed (`data:` events, `stream_options.include_usage`, `[DONE]`; a pause between chunks
with BENCH_STUB_CHUNK_DELAY_MS), usage counted the way the stub counts it (ceil(characters /
4)). Once the stub offers the route itself the harness runs `leaky-tokens serve openai` as is.

    python -m bench.openai_stub --port 0 --ready-file PATH   # the arguments of `serve`
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Body, FastAPI
from fastapi.responses import StreamingResponse

from leaky_tokens.shared.tokenizer import count_messages, count_text

if TYPE_CHECKING:
    from leaky_tokens.settings import Settings

CHAT_COMPLETIONS = "/v1/chat/completions"
REPLY = "Stubbed OpenAI response from the bench"


def offers_chat_completions(app: FastAPI) -> bool:
    return any(getattr(route, "path", None) == CHAT_COMPLETIONS for route in app.routes)


def main_stub_offers_chat_completions() -> bool:
    """Whether `leaky-tokens serve openai` serves the OpenAI route itself (no shim needed)."""
    from leaky_tokens.runtime.compose import build_app
    from leaky_tokens.settings import Settings

    return offers_chat_completions(build_app("openai", Settings()))


def _usage(body: dict[str, Any]) -> dict[str, int]:
    model = str(body.get("model", ""))
    prompt = count_messages("openai", model, body.get("messages", []))
    completion = count_text("openai", model, REPLY)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _stream(body: dict[str, Any], chunk_delay: float) -> AsyncIterator[bytes]:
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model", "stub"),
        "system_fingerprint": None,
    }
    pieces = [{"role": "assistant", "content": ""}] + [
        {"content": word if i == 0 else f" {word}"} for i, word in enumerate(REPLY.split())
    ]
    for delta in pieces:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        yield _event({**head, "choices": [choice]})
        if chunk_delay:
            await asyncio.sleep(chunk_delay)
    finish = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    yield _event({**head, "choices": [finish]})
    if (body.get("stream_options") or {}).get("include_usage"):
        yield _event({**head, "choices": [], "usage": _usage(body)})
    yield _event("[DONE]")


def chat_completions_router(chunk_delay: float = 0.0) -> APIRouter:
    router = APIRouter(tags=["bench"])

    @router.post(CHAT_COMPLETIONS, summary="OpenAI chat completion (bench shim)")
    async def chat_completions(body: Annotated[dict[str, Any], Body()]) -> Any:
        if body.get("stream"):
            return StreamingResponse(_stream(body, chunk_delay), media_type="text/event-stream")
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "stub"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": REPLY},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(body),
        }

    return router


def main() -> None:
    """`leaky-tokens serve openai …` itself, with the route added to the app it builds."""
    from leaky_tokens import cli
    from leaky_tokens.runtime import compose

    delay = float(os.environ.get("BENCH_STUB_CHUNK_DELAY_MS", "0")) / 1000
    build_stub = compose.FACTORIES["openai"]

    def with_chat_completions(settings: Settings) -> FastAPI:
        app = build_stub(settings)
        if not offers_chat_completions(app):
            app.include_router(chat_completions_router(delay))
        return app

    compose.FACTORIES["openai"] = with_chat_completions
    sys.argv = ["leaky-tokens", "serve", "openai", *sys.argv[1:]]
    cli.main()


if __name__ == "__main__":
    main()
