"""HTTP route of `POST /v1/embeddings` (issue 12); the rules are in embeddings.py."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from leaky_tokens.shared.authn import CurrentPrincipal
from leaky_tokens.shared.request_context import current_request_id
from leaky_tokens.tokens.inference.embeddings import EmbeddingService, parse_embedding_request
from leaky_tokens.tokens.inference.errors import InvalidInferenceRequest

router = APIRouter(prefix="/v1", tags=["openai"])


def json_body(raw: bytes) -> object:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidInferenceRequest(
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON "
            "payload."
        ) from None


@router.post("/embeddings")
async def create_embeddings(request: Request, principal: CurrentPrincipal) -> Response:
    service: EmbeddingService = request.app.state.embedding_service
    body = json_body(await request.body())
    embedding = parse_embedding_request(body, service.inference.catalogue)
    answer, headers = await service.embed(principal, embedding, current_request_id())
    return Response(orjson.dumps(answer), media_type="application/json", headers=headers)
