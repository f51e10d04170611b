"""HTTP routes of the Responses API (issue 12): `POST /v1/responses` (plain and streamed) and
`GET /v1/responses/{id}`; the rules are in responses.py."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from leaky_tokens.shared.authn import CurrentPrincipal
from leaky_tokens.shared.principal import Principal
from leaky_tokens.shared.request_context import current_request_id
from leaky_tokens.tokens.idempotency import idempotent
from leaky_tokens.tokens.inference.embeddings_router import json_body
from leaky_tokens.tokens.inference.responses import ResponsesService, parse_responses_request
from leaky_tokens.tokens.inference.router import MeteredEventStream

router = APIRouter(prefix="/v1", tags=["openai"])


def _service(request: Request) -> ResponsesService:
    service: ResponsesService = request.app.state.responses_service
    return service


@router.post("/responses")
async def create_response(request: Request, principal: CurrentPrincipal) -> Response:
    raw = await request.body()
    return await idempotent(request, principal, raw, lambda: _create(request, principal, raw))


async def _create(request: Request, principal: Principal, raw: bytes) -> Response:
    service = _service(request)
    body = json_body(raw)
    parsed = parse_responses_request(body, service.inference.catalogue)
    if parsed.stream:
        stream = await service.open_stream(principal, parsed, current_request_id())
        return MeteredEventStream(stream)
    answer, headers = await service.create(principal, parsed, current_request_id())
    return Response(orjson.dumps(answer), media_type="application/json", headers=headers)


@router.get("/responses/{response_id}")
async def get_response(response_id: str, request: Request, principal: CurrentPrincipal) -> Response:
    """A response you created on a model whose provider stores it (OpenAI, `store` not false);
    anyone else's, a translated one (Qwen, Gemini) or an unknown id: 404 `response_not_found`."""
    body = await _service(request).retrieve(principal, response_id)
    return Response(orjson.dumps(body), media_type="application/json")
