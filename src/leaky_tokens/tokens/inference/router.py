"""HTTP routes of the OpenAI-compatible API (issue 11): `POST /v1/chat/completions` (plain and
`stream: true`), `GET /v1/models`, `GET /v1/models/{id}`. Errors are OpenAI-shaped on these
paths (shared/http.py `face_of`); an API key is accepted as `Authorization: Bearer`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from leaky_tokens.shared.authn import CurrentPrincipal
from leaky_tokens.shared.principal import Principal
from leaky_tokens.shared.request_context import current_request_id
from leaky_tokens.tokens.idempotency import idempotent
from leaky_tokens.tokens.inference.errors import InvalidInferenceRequest
from leaky_tokens.tokens.inference.service import (
    InferenceService,
    MeteredStream,
    parse_chat_request,
)
from leaky_tokens.tokens.sessions import AgentSessionService

router = APIRouter(prefix="/v1", tags=["openai"])


def _service(request: Request) -> InferenceService:
    service: InferenceService = request.app.state.inference_service
    return service


def _json(body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), media_type="application/json", headers=headers)


@router.get("/models")
async def list_models(request: Request, _: CurrentPrincipal) -> Response:
    """The catalogue; `owned_by` is the provider (openai, qwen, gemini)."""
    data = [route.as_openai() for route in _service(request).catalogue]
    return _json({"object": "list", "data": data})


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request, _: CurrentPrincipal) -> Response:
    """One model by catalogue id or `provider/id`; unknown -> 404 `model_not_found`."""
    return _json(_service(request).catalogue.resolve(model_id).as_openai())


@router.post("/chat/completions")
async def chat_completions(request: Request, principal: CurrentPrincipal) -> Response:
    raw = await request.body()
    # An Idempotency-Key replays a stored answer or runs the call under its claim (issue 12).
    return await idempotent(
        request, principal, raw, lambda: _chat_completions(request, principal, raw)
    )


async def _chat_completions(request: Request, principal: Principal, raw: bytes) -> Response:
    service = _service(request)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidInferenceRequest(
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON "
            "payload."
        ) from None
    chat = parse_chat_request(body, service.catalogue)
    if principal.session_id is not None:
        # An agent session's calls go to the model the session is on (it moves on rotation).
        sessions: AgentSessionService = request.app.state.session_service
        model = await sessions.model_for_call(principal)
        chat = dataclasses.replace(chat, route=service.catalogue.resolve(model))
    if chat.stream:
        stream = await service.open_stream(principal, chat, current_request_id())
        return MeteredEventStream(stream)
    answer, headers = await service.complete(principal, chat, current_request_id())
    return _json(answer, headers)


class MeteredEventStream(Response):
    """An ASGI answer that pumps a metered stream to the client and settles it exactly once,
    however it ends: finished, provider cut, or client gone (then the provider call is
    cancelled at once). The settlement runs shielded, so even a cancelled server task settles;
    a killed process leaves a reservation the sweeper refunds."""

    def __init__(self, stream: MeteredStream) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"x-accel-buffering", b"no"),
        ]
        headers += [(k.encode(), v.encode()) for k, v in self.stream.headers().items()]
        pump: asyncio.Task[None] | None = None
        watcher: asyncio.Task[None] | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})

            async def pump_events() -> None:
                async for event in self.stream.events():
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})

            async def until_the_client_leaves() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass

            pump = asyncio.create_task(pump_events())
            watcher = asyncio.create_task(until_the_client_leaves())
            done, _ = await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if pump in done:
                pump.result()
        finally:
            for task in (pump, watcher):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            await asyncio.shield(self.stream.finish())
