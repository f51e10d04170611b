"""The one OpenAI-format stub process every compared system calls (`python -m bench.openai_stub`).

It serves our OpenAI provider stub, the app `leaky-tokens serve openai` serves, on uvicorn with
the same options. While that stub has no `POST /v1/chat/completions` of its own (the provider
emulators are being written), a FastAPI route is added beside its routes: OpenAI's chat
completion wire format, plain and streamed (`data:` events, `stream_options.include_usage`,
`[DONE]`), usage counted the way the stub counts it (ceil(characters / 4)). Once the stub offers
the route itself it is used unchanged, and the harness starts `leaky-tokens serve openai`.

    python -m bench.openai_stub --ready-file PATH   # writes {"pid", "ports": {"openai": N}}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, FastAPI
from fastapi.responses import StreamingResponse

from leaky_tokens.providers.usage import count_prompt_tokens, count_tokens

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
    prompt = count_prompt_tokens(body.get("messages", []))
    completion = count_tokens(REPLY)
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


def build(chunk_delay: float = 0.0) -> FastAPI:
    from leaky_tokens.runtime.compose import build_app
    from leaky_tokens.settings import Settings

    app = build_app("openai", Settings())
    if not offers_chat_completions(app):
        app.include_router(chat_completions_router(chunk_delay))
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    args = parser.parse_args()

    import socket

    import uvicorn
    import uvloop

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(2048)
    # The options `leaky-tokens serve` gives uvicorn (runtime/server.py).
    config = uvicorn.Config(
        build(args.chunk_delay_ms / 1000),
        http="httptools",
        loop="none",
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                await task
                return
            await asyncio.sleep(0.02)
        tmp = args.ready_file.with_suffix(".tmp")
        port = sock.getsockname()[1]
        tmp.write_text(json.dumps({"pid": os.getpid(), "ports": {"openai": port}}))
        tmp.replace(args.ready_file)
        await task

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve())


if __name__ == "__main__":
    main()
