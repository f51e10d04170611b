"""`POST /v1/embeddings` (issue 12): OpenAI's embeddings API for the three providers, metered on
the ledger like a chat.

- OpenAI: `<base>/embeddings`, natively (string, strings, token arrays; `dimensions`).
- Qwen: DashScope's compatible mode `<base>/embeddings` (strings only; it answers float
  vectors whatever is asked, at most 10 inputs a call).
- Gemini: native `<base>/models/{model}:batchEmbedContents` (`outputDimensionality`), its
  `embeddings[].values` translated back.

`encoding_format` is honoured here, whatever the provider answered: the openai SDK asks for
`base64` by default (little-endian float32, base64) and decodes it itself; `float` gets lists.

Metering: the inputs are counted offline (with the model's tokenizer and its safety margin)
and that count plus one token is reserved; the call settles to the `prompt_tokens` the provider
reports (Gemini may report none: then the offline count, marked estimated) and refunds the rest.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from dataclasses import dataclass
from typing import Any

from leaky_tokens.shared.principal import Principal
from leaky_tokens.shared.tokenizer import Tokenizer, tokenizer_for
from leaky_tokens.tokens.inference.adapters import (
    Endpoint,
    ProviderHttp,
    _gemini_error,
    endpoints_from_settings,
    openai_error_of,
)
from leaky_tokens.tokens.inference.catalogue import Catalogue, ModelRoute
from leaky_tokens.tokens.inference.errors import ContextLengthExceeded, InvalidInferenceRequest
from leaky_tokens.tokens.inference.service import InferenceService, provider_http_error
from leaky_tokens.tokens.inference.wire import ProviderError, Usage

# DashScope's compatible mode takes at most this many inputs a call; OpenAI 2048.
MAX_INPUTS = {"openai": 2048, "qwen": 10, "gemini": 100}
Vector = list[float] | str  # floats, or OpenAI's base64 of little-endian float32


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """A parsed /v1/embeddings body. `inputs` holds strings, or token arrays (OpenAI only)."""

    route: ModelRoute
    inputs: list[str | list[int]]
    encoding_format: str  # "float" | "base64"
    dimensions: int | None
    user: str | None


def _invalid(message: str, param: str | None) -> InvalidInferenceRequest:
    details = [{"field": param, "message": message}] if param else None
    return InvalidInferenceRequest(message, details=details)


def _is_tokens(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


def parse_embedding_request(body: Any, catalogue: Catalogue) -> EmbeddingRequest:
    if not isinstance(body, dict):
        raise _invalid("The request body must be a JSON object.", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("you must provide a model parameter", "model")
    bad_input = _invalid(
        "Invalid 'input': expected a non-empty string, an array of strings, an array of tokens "
        "or an array of token arrays.",
        "input",
    )
    raw = body.get("input")
    inputs: list[str | list[int]]
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and _is_tokens(raw):
        inputs = [list(raw)]
    elif isinstance(raw, list) and raw:
        inputs = []
        for item in raw:
            if isinstance(item, str):
                inputs.append(item)
            elif _is_tokens(item):
                inputs.append(list(item))
            else:
                raise bad_input
    else:
        raise bad_input
    if any(isinstance(item, str) and not item for item in inputs):
        raise _invalid("Invalid 'input': an input must not be an empty string.", "input")
    encoding = body.get("encoding_format", "float")
    if encoding is None:
        encoding = "float"
    if encoding not in ("float", "base64"):
        raise _invalid(
            "Invalid 'encoding_format': expected 'float' or 'base64'.", "encoding_format"
        )
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        raise _invalid("Invalid 'dimensions': expected an integer >= 1.", "dimensions")
    user = body.get("user")
    route = catalogue.resolve_for(model, "embedding")
    if len(inputs) > MAX_INPUTS[route.provider]:
        raise _invalid(
            f"Invalid 'input': at most {MAX_INPUTS[route.provider]} inputs per request for "
            f"`{model}`.",
            "input",
        )
    if route.provider != "openai" and any(not isinstance(i, str) for i in inputs):
        raise _invalid(f"Invalid 'input': `{model}` takes text inputs only.", "input")
    return EmbeddingRequest(
        route, inputs, encoding, dimensions, user if isinstance(user, str) else None
    )


# --- vectors -----------------------------------------------------------------------------------


def encode_base64(values: list[float]) -> str:
    """OpenAI's `encoding_format: base64`: little-endian float32, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def decode_base64(value: str) -> list[float]:
    raw = base64.b64decode(value, validate=True)
    if len(raw) % 4:
        raise ValueError("not a float32 array")
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def as_encoding(vector: Vector, encoding: str) -> Vector:
    """The vector in the encoding the client asked for, whichever the provider answered."""
    if encoding == "base64":
        return vector if isinstance(vector, str) else encode_base64(vector)
    return decode_base64(vector) if isinstance(vector, str) else vector


def _vector(value: Any) -> Vector:
    if isinstance(value, str):
        try:
            decode_base64(value)
        except ValueError:
            raise ProviderError("failed", "the provider answered an unreadable vector") from None
        return value
    if isinstance(value, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        return [float(v) for v in value]
    raise ProviderError("failed", "the provider answered an unexpected embedding")


# --- adapters --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Embedded:
    vectors: list[Vector]
    prompt_tokens: int | None  # None: the provider reported no usage


class EmbeddingAdapters:
    """Each provider's embeddings API, over the /v1 adapters' one HTTP session and retry rule."""

    def __init__(self, endpoints: dict[str, Endpoint], http: ProviderHttp) -> None:
        self.endpoints = endpoints
        self.http = http

    @classmethod
    def from_settings(cls, settings: Any, http: ProviderHttp) -> EmbeddingAdapters:
        return cls(endpoints_from_settings(settings), http)

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.http.settings.timeout_seconds

    async def embed(self, request: EmbeddingRequest) -> Embedded:
        if request.route.provider == "gemini":
            return await self._gemini(request)
        return await self._openai_compatible(request)

    async def _openai_compatible(self, request: EmbeddingRequest) -> Embedded:
        route = request.route
        endpoint = self.endpoints[route.provider]
        payload: dict[str, Any] = {
            "model": route.upstream_model,
            "input": request.inputs,
            # DashScope answers floats whatever is asked; OpenAI's base64 is 4x smaller.
            "encoding_format": "base64" if route.provider == "openai" else "float",
        }
        if request.dimensions is not None:
            payload["dimensions"] = request.dimensions
        if request.user is not None and route.provider == "openai":
            payload["user"] = request.user
        deadline = self._deadline()
        response = await self.http.send(
            route.provider,
            f"{endpoint.base_url}/embeddings",
            {"authorization": f"Bearer {endpoint.api_key}", "accept": "*/*"},
            payload,
            openai_error_of,
            deadline=deadline,
        )
        body = await self.http.read_json(response, deadline)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or len(data) != len(request.inputs):
            raise ProviderError("failed", "the provider answered an unexpected body")
        ordered = sorted(
            (item for item in data if isinstance(item, dict)), key=lambda i: i.get("index", 0)
        )
        vectors = [_vector(item.get("embedding")) for item in ordered]
        if len(vectors) != len(request.inputs):
            raise ProviderError("failed", "the provider answered an unexpected body")
        usage = body.get("usage")
        prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        return Embedded(vectors, prompt if isinstance(prompt, int) and prompt >= 0 else None)

    async def _gemini(self, request: EmbeddingRequest) -> Embedded:
        route = request.route
        endpoint = self.endpoints["gemini"]
        one: dict[str, Any] = {"model": f"models/{route.upstream_model}"}
        if request.dimensions is not None:
            one["outputDimensionality"] = request.dimensions
        payload = {
            "requests": [{**one, "content": {"parts": [{"text": text}]}} for text in request.inputs]
        }
        deadline = self._deadline()
        response = await self.http.send(
            "gemini",
            f"{endpoint.base_url}/models/{route.upstream_model}:batchEmbedContents",
            {"x-goog-api-key": endpoint.api_key, "accept": "*/*"},
            payload,
            _gemini_error,
            deadline=deadline,
        )
        body = await self.http.read_json(response, deadline)
        embeddings = body.get("embeddings") if isinstance(body, dict) else None
        if not isinstance(embeddings, list) or len(embeddings) != len(request.inputs):
            raise ProviderError("failed", "the provider answered an unexpected body")
        vectors = [_vector(e.get("values") if isinstance(e, dict) else None) for e in embeddings]
        metadata = body.get("usageMetadata")
        prompt = metadata.get("promptTokenCount") if isinstance(metadata, dict) else None
        return Embedded(vectors, prompt if isinstance(prompt, int) and prompt >= 0 else None)


# --- the metered call ------------------------------------------------------------------------


def count_inputs(tokenizer: Tokenizer, inputs: list[str | list[int]]) -> int:
    """Tokens of the inputs as the provider would count them (token arrays are exact)."""
    return sum(len(i) if isinstance(i, list) else tokenizer.count(i) for i in inputs)


class EmbeddingService:
    def __init__(self, inference: InferenceService, adapters: EmbeddingAdapters) -> None:
        self.inference = inference
        self.adapters = adapters

    async def embed(
        self, principal: Principal, request: EmbeddingRequest, request_id: str | None
    ) -> tuple[dict[str, Any], dict[str, str]]:
        route = request.route
        tokenizer = tokenizer_for(route.provider, route.upstream_model)
        for index, item in enumerate(request.inputs):
            size = len(item) if isinstance(item, list) else tokenizer.count(item)
            if size > route.context_window:
                message = (
                    f"This model's maximum input length is {route.context_window} tokens; "
                    f"input[{index}] takes {size}."
                )
                raise ContextLengthExceeded(
                    message, details=[{"field": "input", "message": message}]
                )
        counted = count_inputs(tokenizer, request.inputs)
        estimate = tokenizer.upper_bound(counted)
        inference = self.inference
        admission = await inference.admit_counted(
            principal,
            route,
            tokenizer,
            prompt=estimate,
            allowance=1,
            minimum=1,
            stream=False,
            request_id=request_id,
        )
        try:
            try:
                embedded = await self.adapters.embed(request)
            except ProviderError as exc:
                await inference._refund(admission, "PROVIDER_FAILURE", {"reason": exc.message})
                raise provider_http_error(exc) from None
            estimated = embedded.prompt_tokens is None
            prompt = counted if embedded.prompt_tokens is None else embedded.prompt_tokens
            charged = await inference.settle(
                admission, Usage(prompt, 0), estimated=estimated, outcome="completed"
            )
        finally:
            if not admission.settled:
                await asyncio.shield(inference._refund(admission, "ABANDONED", {}))
        answer = {
            "object": "list",
            "data": [
                {
                    "object": "embedding",
                    "index": index,
                    "embedding": as_encoding(vector, request.encoding_format),
                }
                for index, vector in enumerate(embedded.vectors)
            ],
            "model": route.id,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }
        return answer, admission.rate_limit_headers(charged)
