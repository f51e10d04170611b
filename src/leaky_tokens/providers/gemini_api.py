"""The Gemini API, native (`/v1beta/models/{model}:generateContent` and friends).

Kept as the real API has them, since an adapter must survive them: streams are
`data: <GenerateContentResponse>\\r\\n\\r\\n` with no `[DONE]`; intermediate chunks carry only
`promptTokenCount`/`totalTokenCount`, and `candidatesTokenCount` (omitted when zero) and
`thoughtsTokenCount` come on the last chunk only; thinking models (2.5, 3, "thinking") spend
thought tokens inside `maxOutputTokens`, billed apart from the candidates; the key comes as
`x-goog-api-key` or `?key=`; errors are google.rpc statuses (`RESOURCE_EXHAUSTED` with
`RetryInfo.retryDelay` in the body, not a header), optionally wrapped in a JSON array.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from leaky_tokens.providers.emulation import (
    ProviderApiError,
    Reply,
    admit,
    compose_reply,
    embedding_vector,
    json_response,
    optional_int,
    paced_events,
    read_json_object,
    request_seed,
    sse,
    stream_response,
)
from leaky_tokens.providers.faults import Decision, FaultInjector
from leaky_tokens.settings import StubSettings
from leaky_tokens.shared.clock import Clock
from leaky_tokens.shared.tokenizer import tokenizer_for

# v1beta is what the REST docs and most clients use; google-genai 3.x defaults to v1.
PREFIXES = ("/v1beta", "/v1")
MODELS = ("gemini-2.5-flash", "gemini-2.5-pro", "gemini-2.0-flash", "gemini-embedding-001")
EMBEDDING_DIMENSIONS = 3072
_SEPARATOR = b"\r\n\r\n"
_STATUS = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def retry_delay(milliseconds: int) -> str:
    """A google.protobuf.Duration in JSON: "19s", "3.700s"."""
    seconds, millis = divmod(milliseconds, 1000)
    return f"{seconds}s" if not millis else f"{seconds}.{millis:03d}s"


def field(body: Mapping[str, Any], camel: str, snake: str) -> Any:
    """A request field under its JSON name or its proto name (the API takes both)."""
    return body.get(camel, body.get(snake))


def thinking_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    found = field(config, "thinkingConfig", "thinking_config")
    return found if isinstance(found, dict) else {}


def is_thinking_model(model: str, config: Mapping[str, Any]) -> bool:
    if field(thinking_config(config), "thinkingBudget", "thinking_budget") == 0:
        return False
    return "2.5" in model or model.startswith("gemini-3") or "thinking" in model


@dataclass(frozen=True, slots=True)
class GenerateCall:
    model: str
    messages: list[dict[str, Any]]  # OpenAI-style, for counting and seeding
    max_output: int | None
    thinking: bool
    include_thoughts: bool


class GeminiEmulator:
    def __init__(self, *, injector: FaultInjector, clock: Clock, settings: StubSettings) -> None:
        self.injector = injector
        self.clock = clock
        self.settings = settings

    # --- errors -------------------------------------------------------------------------

    def error(
        self,
        status: int,
        message: str,
        details: list[dict[str, Any]] | None = None,
        *,
        as_array: bool | None = None,
    ) -> ProviderApiError:
        inner: dict[str, Any] = {"code": status, "message": message, "status": _STATUS[status]}
        if details:
            inner["details"] = details
        body: Any = {"error": inner}
        wrap = self.injector.faults.error_as_array if as_array is None else as_array
        return ProviderApiError(status, [body] if wrap else body)

    def invalid(self, message: str) -> ProviderApiError:
        return self.error(400, message)

    def fault(self, decision: Decision, model: str) -> ProviderApiError:
        wrap = decision.faults.error_as_array
        if decision.error == "rate_limited":
            details: list[dict[str, Any]] = [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {
                            "quotaMetric": "generativelanguage.googleapis.com/"
                            "generate_content_free_tier_requests",
                            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                            "quotaDimensions": {"location": "global", "model": model},
                            "quotaValue": "10",
                        }
                    ],
                },
                {
                    "@type": "type.googleapis.com/google.rpc.Help",
                    "links": [
                        {
                            "description": "Learn more about Gemini API quotas",
                            "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                        }
                    ],
                },
                {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": retry_delay(decision.faults.retry_after_ms),
                },
            ]
            message = (
                "You exceeded your current quota, please check your plan and billing details. "
                "For more information on this error, head to: "
                "https://ai.google.dev/gemini-api/docs/rate-limits."
            )
            return self.error(429, message, details, as_array=wrap)
        if decision.error == "down":
            return self.error(
                503, "The model is overloaded. Please try again later.", as_array=wrap
            )
        return self.server_error(as_array=wrap)

    def server_error(self, *, as_array: bool | None = None) -> ProviderApiError:
        message = (
            "An internal error has occurred. Please retry or report in "
            "https://developers.generativeai.google/guide/troubleshooting"
        )
        return self.error(500, message, as_array=as_array)

    def check_key(self, request: Request) -> None:
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key") or ""
        if not key:
            raise self.error(
                403,
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to call "
                "this API.",
            )
        expected = self.settings.api_key
        if expected and key != expected:
            details = [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                }
            ]
            raise self.error(400, "API key not valid. Please pass a valid API key.", details)

    # --- parsing ------------------------------------------------------------------------

    def _messages(self, body: Mapping[str, Any]) -> list[dict[str, Any]]:
        contents = body.get("contents")
        if isinstance(contents, dict):
            contents = [contents]
        if not isinstance(contents, list) or not contents:
            raise self.invalid("* GenerateContentRequest.contents: contents is not specified\n")
        messages: list[dict[str, Any]] = []
        system = field(body, "systemInstruction", "system_instruction")
        if isinstance(system, dict):
            messages.append({"role": "system", "content": parts_text(system.get("parts"))})
        for i, content in enumerate(contents):
            if not isinstance(content, dict) or not isinstance(content.get("parts"), list):
                raise self.invalid(
                    f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be "
                    "empty.\n"
                )
            role = {"model": "assistant", "function": "tool"}.get(
                str(content.get("role", "user")), "user"
            )
            messages.append({"role": role, "content": parts_text(content["parts"])})
        return messages

    def parse(self, model: str, body: Mapping[str, Any]) -> GenerateCall:
        messages = self._messages(body)
        config = field(body, "generationConfig", "generation_config") or {}
        if not isinstance(config, dict):
            raise self.invalid("Invalid value at 'generation_config': expected an object.")
        try:
            _, max_output = optional_int(config, "maxOutputTokens", "max_output_tokens")
        except ValueError:
            raise self.invalid(
                "* GenerateContentRequest.generation_config.max_output_tokens: must be a "
                "positive integer.\n"
            ) from None
        include_thoughts = bool(
            field(thinking_config(config), "includeThoughts", "include_thoughts")
        )
        return GenerateCall(
            model, messages, max_output, is_thinking_model(model, config), include_thoughts
        )

    async def _admit(self, request: Request, model: str) -> Decision:
        return await admit(self.injector, request, lambda d: self.fault(d, model))

    # --- generateContent ------------------------------------------------------------------

    async def _call(
        self, request: Request, model: str
    ) -> tuple[GenerateCall, Decision, Reply, int]:
        self.check_key(request)
        call = self.parse(model, await read_json_object(request, self.invalid))
        decision = await self._admit(request, model)
        tokenizer = tokenizer_for("gemini", model)
        prompt_tokens = tokenizer.count_messages(call.messages)
        reply = compose_reply(
            tokenizer,
            seed=request_seed(model, call.messages),
            max_output=call.max_output,
            thinking=call.thinking,
            settings=self.settings,
        )
        return call, decision, reply, prompt_tokens

    async def generate_content(self, request: Request, model: str) -> Response:
        call, _, reply, prompt_tokens = await self._call(request, model)
        parts: list[dict[str, Any]] = []
        if call.include_thoughts and reply.reasoning_text:
            parts.append({"text": reply.reasoning_text, "thought": True})
        if reply.text:
            parts.append({"text": reply.text})
        return json_response(
            self.chunk(model, parts, reply, prompt_tokens, f"{uuid.uuid4().hex[:22]}", last=True)
        )

    async def stream_generate_content(self, request: Request, model: str) -> Response:
        call, decision, reply, prompt_tokens = await self._call(request, model)
        events = self.stream_chunks(call, reply, prompt_tokens)
        if request.query_params.get("alt") != "sse":
            # Without alt=sse the API streams one JSON array of the same chunks.
            body = b"[" + b",\r\n".join(orjson.dumps(c) for c in events) + b"]"
            return Response(body, media_type="application/json")
        paced = paced_events(
            (sse(c, separator=_SEPARATOR) for c in events),
            decision,
            default_delay_ms=self.settings.chunk_delay_ms,
            error_event=lambda _: sse(self.server_error(as_array=False).body, separator=_SEPARATOR),
        )
        return stream_response(paced, {})

    def stream_chunks(
        self, call: GenerateCall, reply: Reply, prompt_tokens: int
    ) -> Iterator[dict[str, Any]]:
        response_id = uuid.uuid4().hex[:22]
        pieces: list[dict[str, Any]] = []
        if call.include_thoughts:
            pieces.extend({"text": p, "thought": True} for p in reply.reasoning_pieces)
        pieces.extend({"text": p} for p in reply.pieces)
        for part in pieces[:-1]:
            yield self.chunk(call.model, [part], reply, prompt_tokens, response_id, last=False)
        yield self.chunk(call.model, pieces[-1:], reply, prompt_tokens, response_id, last=True)

    def chunk(
        self,
        model: str,
        parts: list[dict[str, Any]],
        reply: Reply,
        prompt_tokens: int,
        response_id: str,
        *,
        last: bool,
    ) -> dict[str, Any]:
        content: dict[str, Any] = {"role": "model"}
        if parts:
            content["parts"] = parts
        candidate: dict[str, Any] = {"content": content, "index": 0}
        usage: dict[str, Any] = {"promptTokenCount": prompt_tokens}
        if last:
            candidate["finishReason"] = "STOP" if reply.finish == "stop" else "MAX_TOKENS"
            if reply.answer_tokens:
                usage["candidatesTokenCount"] = reply.answer_tokens
            usage["totalTokenCount"] = prompt_tokens + reply.output_tokens
            usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt_tokens}]
            if reply.reasoning_tokens:
                usage["thoughtsTokenCount"] = reply.reasoning_tokens
        else:
            usage["totalTokenCount"] = prompt_tokens
        return {
            "candidates": [candidate],
            "usageMetadata": usage,
            "modelVersion": model,
            "responseId": response_id,
        }

    async def count_tokens(self, request: Request, model: str) -> Response:
        self.check_key(request)
        body = await read_json_object(request, self.invalid)
        inner = body.get("generateContentRequest", body)
        if not isinstance(inner, dict):
            raise self.invalid("Invalid value at 'generate_content_request'.")
        total = tokenizer_for("gemini", model).count_messages(self._messages(inner))
        return json_response(
            {
                "totalTokens": total,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": total}],
            }
        )

    # --- embeddings ---------------------------------------------------------------------

    def _embed_one(self, request_body: Any, model: str) -> tuple[list[float], int]:
        if not isinstance(request_body, dict) or not isinstance(request_body.get("content"), dict):
            raise self.invalid("* EmbedContentRequest.content: content is not specified\n")
        text = parts_text(request_body["content"].get("parts"))
        if not text:
            raise self.invalid("* EmbedContentRequest.content: contents must not be empty\n")
        try:
            _, size = optional_int(request_body, "outputDimensionality", "output_dimensionality")
        except ValueError:
            raise self.invalid(
                "* EmbedContentRequest.output_dimensionality: must be positive.\n"
            ) from None
        tokens = tokenizer_for("gemini", model).count(text)
        return embedding_vector(text, size or EMBEDDING_DIMENSIONS), tokens

    async def embed_content(self, request: Request, model: str) -> Response:
        self.check_key(request)
        body = await read_json_object(request, self.invalid)
        vector, tokens = self._embed_one(body, model)
        await self._admit(request, model)
        return json_response({"embedding": {"values": vector}, "usageMetadata": _usage(tokens)})

    async def batch_embed_contents(self, request: Request, model: str) -> Response:
        self.check_key(request)
        body = await read_json_object(request, self.invalid)
        requests = body.get("requests")
        if not isinstance(requests, list) or not requests:
            raise self.invalid("* BatchEmbedContentsRequest.requests: requests is not specified\n")
        embedded = [self._embed_one(r, model) for r in requests]
        await self._admit(request, model)
        return json_response(
            {
                "embeddings": [{"values": vector} for vector, _ in embedded],
                "usageMetadata": _usage(sum(tokens for _, tokens in embedded)),
            }
        )

    # --- models -------------------------------------------------------------------------

    @staticmethod
    def model_object(model: str) -> dict[str, Any]:
        embedding = "embedding" in model
        methods = (
            ["embedContent", "batchEmbedContents"]
            if embedding
            else [
                "generateContent",
                "countTokens",
            ]
        )
        return {
            "name": f"models/{model}",
            "version": "001",
            "displayName": model,
            "inputTokenLimit": 2048 if embedding else 1048576,
            "outputTokenLimit": 1 if embedding else 65536,
            "supportedGenerationMethods": methods,
            "thinking": is_thinking_model(model, {}),
        }

    async def list_models(self, request: Request) -> Response:
        self.check_key(request)
        return json_response({"models": [self.model_object(m) for m in MODELS]})

    async def get_model(self, request: Request, model: str) -> Response:
        self.check_key(request)
        return json_response(self.model_object(model))


def _usage(tokens: int) -> dict[str, int]:
    return {"promptTokenCount": tokens, "totalTokenCount": tokens}


def parts_text(parts: Any) -> str:
    """The text a model reads in Gemini parts: text, function calls and their results."""
    if not isinstance(parts, list):
        return ""
    pieces: list[str] = []
    for part in parts:
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("text"), str):
            pieces.append(part["text"])
        for key in ("functionCall", "functionResponse"):
            if isinstance(part.get(key), dict):
                pieces.append(orjson.dumps(part[key]).decode())
    return "".join(pieces)


def build_gemini_router(emulator: GeminiEmulator, prefix: str) -> APIRouter:
    router = APIRouter(prefix=prefix, tags=["gemini-emulator"])
    add = router.add_api_route
    add(
        "/models/{model}:generateContent",
        emulator.generate_content,
        methods=["POST"],
        summary="Gemini generateContent",
    )
    add(
        "/models/{model}:streamGenerateContent",
        emulator.stream_generate_content,
        methods=["POST"],
        summary="Gemini streamGenerateContent (SSE with ?alt=sse, else a JSON array)",
    )
    add(
        "/models/{model}:countTokens",
        emulator.count_tokens,
        methods=["POST"],
        summary="Gemini countTokens",
    )
    add(
        "/models/{model}:embedContent",
        emulator.embed_content,
        methods=["POST"],
        summary="Gemini embedContent",
    )
    add(
        "/models/{model}:batchEmbedContents",
        emulator.batch_embed_contents,
        methods=["POST"],
        summary="Gemini batchEmbedContents",
    )
    add("/models", emulator.list_models, methods=["GET"], summary="Gemini model list")
    add("/models/{model}", emulator.get_model, methods=["GET"], summary="One Gemini model")
    return router
