"""The OpenAI API (`/v1`) and DashScope's OpenAI-compatible mode (`/compatible-mode/v1`).

Both speak Chat Completions, Models and Embeddings; OpenAI also the Responses API. DashScope's
differences are kept, since an adapter must survive them: `usage: null` on every chunk and the
usage chunk only with `include_usage`, content chunks whose `finish_reason` is `""`,
`reasoning_content` deltas for thinking models, `Throttling.RateQuota` 429s without a retry
header, a `request_id` in error bodies, at most 10 embedding inputs and float vectors always.
"""

from __future__ import annotations

import itertools
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Request
from starlette.responses import Response

from leaky_tokens.providers.emulation import (
    ProviderApiError,
    Reply,
    admit,
    base64_floats,
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
from leaky_tokens.shared.request_context import current_request_id
from leaky_tokens.shared.tokenizer import Tokenizer, message_text, tokenizer_for

Flavour = Literal["openai", "qwen"]

MODELS: Mapping[Flavour, tuple[str, ...]] = {
    "openai": (
        "gpt-4o-mini",
        "gpt-4o",
        "gpt-4.1-mini",
        "gpt-5-mini",
        "o3-mini",
        "text-embedding-3-small",
        "text-embedding-3-large",
    ),
    "qwen": ("qwen-turbo", "qwen-plus", "qwen-max", "qwen3-max", "qwq-plus", "text-embedding-v3"),
}
DASHSCOPE_MAX_EMBEDDING_INPUTS = 10
STORED_RESPONSES = 1000
_DONE = b"data: [DONE]\n\n"


def _retry_hint(milliseconds: int) -> str:
    return f"{milliseconds}ms" if milliseconds < 1000 else f"{milliseconds / 1000:g}s"


@dataclass(frozen=True, slots=True)
class ChatCall:
    model: str
    messages: list[dict[str, Any]]
    max_output: int | None
    stream: bool
    include_usage: bool
    thinking: bool


class Dialect:
    """One flavour's errors and wire details; OpenAI's by default."""

    def __init__(self, flavour: Flavour) -> None:
        self.flavour: Flavour = flavour
        self.dashscope = flavour == "qwen"
        self.prefix = "/compatible-mode/v1" if self.dashscope else "/v1"

    def error(
        self,
        status: int,
        message: str,
        kind: str,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ProviderApiError:
        body: dict[str, Any] = {
            "error": {"message": message, "type": kind, "param": param, "code": code}
        }
        if self.dashscope:
            body["request_id"] = current_request_id()
        return ProviderApiError(status, body, headers)

    def invalid(self, message: str, param: str | None = None) -> ProviderApiError:
        code = "invalid_parameter_error" if self.dashscope else None
        return self.error(400, message, "invalid_request_error", code, param)

    def fault(self, decision: Decision, model: str) -> ProviderApiError:
        wait_ms = decision.faults.retry_after_ms
        retry = {
            "retry-after": str(decision.faults.retry_after_seconds),
            "retry-after-ms": str(wait_ms),
        }
        if decision.error == "rate_limited":
            if self.dashscope:
                message = "Requests rate limit exceeded, please try again later."
                return self.error(429, message, "Throttling.RateQuota", "Throttling.RateQuota")
            message = (
                f"Rate limit reached for {model} in organization org-stub on requests per min "
                f"(RPM): Limit 60, Used 60, Requested 1. Please try again in "
                f"{_retry_hint(wait_ms)}. Visit https://platform.openai.com/account/rate-limits "
                "to learn more."
            )
            headers = {**retry, **rate_limit_headers(remaining=0)}
            return self.error(429, message, "requests", "rate_limit_exceeded", headers=headers)
        if decision.error == "down":
            if self.dashscope:
                message = "The service is temporarily unavailable, please try again later."
                return self.error(503, message, "ServiceUnavailable", "ServiceUnavailable")
            message = "The server is overloaded or not ready yet."
            return self.error(503, message, "server_error", headers=retry)
        return self.server_error()

    def server_error(self) -> ProviderApiError:
        if self.dashscope:
            message = (
                "An internal error has occured, please try again later or contact service support."
            )
            return self.error(500, message, "InternalError", "InternalError")
        message = "The server had an error while processing your request. Sorry about that!"
        return self.error(500, message, "server_error")

    def check_key(self, request: Request, expected: str) -> None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            message = (
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
            code = "invalid_api_key" if self.dashscope else None
            raise self.error(401, message, "invalid_request_error", code)
        if expected and key != expected:
            message = (
                "Incorrect API key provided. "
                if self.dashscope
                else f"Incorrect API key provided: {key[:3]}***{key[-4:]}. You can find your "
                "API key at https://platform.openai.com/account/api-keys."
            )
            raise self.error(401, message, "invalid_request_error", "invalid_api_key")


def rate_limit_headers(*, remaining: int = 59) -> dict[str, str]:
    return {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": str(remaining),
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "150000",
        "x-ratelimit-remaining-tokens": "149000" if remaining else "0",
        "x-ratelimit-reset-tokens": "6m0s",
    }


def is_reasoning_model(model: str) -> bool:
    """OpenAI's o-series and gpt-5 think before answering (hidden reasoning tokens)."""
    name = model.rsplit("/", 1)[-1]
    return name.startswith(("o1", "o3", "o4", "gpt-5"))


def is_qwen_thinking(model: str, body: Mapping[str, Any]) -> bool:
    return body.get("enable_thinking") is True or "qwq" in model or "thinking" in model


class OpenAiEmulator:
    """The routes' logic for one flavour, with the stub's faults, clock and settings."""

    def __init__(
        self,
        flavour: Flavour,
        *,
        injector: FaultInjector,
        clock: Clock,
        settings: StubSettings,
    ) -> None:
        self.dialect = Dialect(flavour)
        self.flavour = flavour
        self.injector = injector
        self.clock = clock
        self.settings = settings
        self.stored: OrderedDict[str, dict[str, Any]] = OrderedDict()

    # --- parsing ------------------------------------------------------------------------

    def _model(self, body: Mapping[str, Any]) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise self.dialect.invalid("you must provide a model parameter", "model")
        return model

    def _max_output(self, body: Mapping[str, Any], *names: str) -> int | None:
        try:
            return optional_int(body, *names)[1]
        except ValueError as bad:
            name = str(bad)
            raise self.dialect.invalid(
                f"Invalid '{name}': integer below minimum value. Expected a value >= 1.", name
            ) from None

    def parse_chat(self, body: Mapping[str, Any]) -> ChatCall:
        model = self._model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise self.dialect.invalid(
                "Invalid 'messages': expected a non-empty array of messages.", "messages"
            )
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise self.dialect.invalid(
                    f"Invalid 'messages[{i}]': expected an object with a 'role'.",
                    f"messages[{i}]",
                )
        stream = body.get("stream") is True
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        thinking = (
            is_qwen_thinking(model, body) if self.dialect.dashscope else is_reasoning_model(model)
        )
        return ChatCall(
            model,
            messages,
            # max_completion_tokens is the newer name; when both are sent it wins.
            self._max_output(body, "max_completion_tokens", "max_tokens"),
            stream,
            include_usage,
            thinking,
        )

    def _reply(
        self,
        tokenizer: Tokenizer,
        call_model: str,
        messages: list[dict[str, Any]],
        max_output: int | None,
        thinking: bool,
    ) -> Reply:
        return compose_reply(
            tokenizer,
            seed=request_seed(call_model, messages),
            max_output=max_output,
            thinking=thinking,
            settings=self.settings,
        )

    async def _admit(self, request: Request, model: str) -> Decision:
        return await admit(self.injector, request, lambda d: self.dialect.fault(d, model))

    def _headers(self) -> dict[str, str]:
        return {} if self.dialect.dashscope else rate_limit_headers()

    # --- chat completions ---------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        self.dialect.check_key(request, self.settings.api_key)
        call = self.parse_chat(await read_json_object(request, self.dialect.invalid))
        decision = await self._admit(request, call.model)
        tokenizer = tokenizer_for(self.flavour, call.model)
        prompt_tokens = tokenizer.count_messages(call.messages)
        reply = self._reply(tokenizer, call.model, call.messages, call.max_output, call.thinking)
        usage = self.chat_usage(prompt_tokens, reply)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(self.clock.now().timestamp())
        if call.stream:
            events = self.chat_chunks(call, reply, usage, completion_id, created)
            paced = paced_events(
                events,
                decision,
                default_delay_ms=self.settings.chunk_delay_ms,
                error_event=lambda _: sse(self.dialect.server_error().body),
            )
            return stream_response(paced, self._headers())
        message: dict[str, Any] = {"role": "assistant", "content": reply.text}
        if self.dialect.dashscope and call.thinking:
            message["reasoning_content"] = reply.reasoning_text
        if not self.dialect.dashscope:
            message["refusal"] = None
            message["annotations"] = []
        body = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": call.model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish}
            ],
            "usage": usage,
            "system_fingerprint": None if self.dialect.dashscope else "fp_stub",
        }
        if not self.dialect.dashscope:
            body["service_tier"] = "default"
        return json_response(body, headers=self._headers())

    def chat_usage(self, prompt_tokens: int, reply: Reply) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": reply.output_tokens,
            "total_tokens": prompt_tokens + reply.output_tokens,
        }
        if self.dialect.dashscope:
            usage["prompt_tokens_details"] = {"cached_tokens": 0}
            if reply.reasoning_tokens:
                usage["completion_tokens_details"] = {"reasoning_tokens": reply.reasoning_tokens}
            return usage
        usage["prompt_tokens_details"] = {"cached_tokens": 0, "audio_tokens": 0}
        usage["completion_tokens_details"] = {
            "reasoning_tokens": reply.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        }
        return usage

    def chat_chunks(
        self,
        call: ChatCall,
        reply: Reply,
        usage: dict[str, Any],
        completion_id: str,
        created: int,
    ) -> Iterator[bytes]:
        dashscope = self.dialect.dashscope
        base: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": call.model,
            "system_fingerprint": None if dashscope else "fp_stub",
        }
        if not dashscope:
            base["service_tier"] = "default"
        # DashScope puts `usage: null` on every chunk; OpenAI only when usage was asked for.
        null_usage = dashscope or call.include_usage

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            payload = {**base, "choices": [choice]}
            if null_usage:
                payload["usage"] = None
            return sse(payload)

        role: dict[str, Any] = {"role": "assistant", "content": ""}
        if not dashscope:
            role["refusal"] = None
        yield chunk(role, None)
        if dashscope:
            for piece in reply.reasoning_pieces if call.thinking else ():
                yield chunk({"content": None, "reasoning_content": piece}, None)
        for piece in reply.pieces:
            yield chunk({"content": piece}, "" if dashscope else None)
        yield chunk({"content": ""} if dashscope else {}, reply.finish)
        if call.include_usage:
            yield sse({**base, "choices": [], "usage": usage})
        yield _DONE

    # --- models -------------------------------------------------------------------------

    def model_object(self, model: str) -> dict[str, Any]:
        owner = "system" if self.dialect.dashscope else "openai"
        return {"id": model, "object": "model", "created": 1700000000, "owned_by": owner}

    async def list_models(self, request: Request) -> Response:
        self.dialect.check_key(request, self.settings.api_key)
        data = [self.model_object(m) for m in MODELS[self.flavour]]
        return json_response({"object": "list", "data": data})

    async def get_model(self, request: Request, model: str) -> Response:
        # Any model name is served, so any model can be looked up.
        self.dialect.check_key(request, self.settings.api_key)
        return json_response(self.model_object(model))

    # --- embeddings ---------------------------------------------------------------------

    async def embeddings(self, request: Request) -> Response:
        self.dialect.check_key(request, self.settings.api_key)
        body = await read_json_object(request, self.dialect.invalid)
        model = self._model(body)
        texts, tokens = self._embedding_inputs(body.get("input"), model)
        dimensions = self._max_output(body, "dimensions") or default_dimensions(model)
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise self.dialect.invalid(
                "Invalid 'encoding_format': expected 'float' or 'base64'.", "encoding_format"
            )
        await self._admit(request, model)
        data = []
        for index, text in enumerate(texts):
            vector = embedding_vector(text, dimensions)
            # DashScope answers float lists whatever was asked (the SDK copes with either).
            value: Any = vector if encoding == "float" or self.dialect.dashscope else None
            data.append(
                {
                    "object": "embedding",
                    "index": index,
                    "embedding": base64_floats(vector) if value is None else value,
                }
            )
        answer: dict[str, Any] = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        if self.dialect.dashscope:
            answer["id"] = str(uuid.uuid4())
        return json_response(answer, headers=self._headers())

    def _embedding_inputs(self, raw: Any, model: str) -> tuple[list[str], int]:
        """Each input's text (token arrays become their numbers' text) and the token total."""
        bad = self.dialect.invalid(
            "Invalid 'input': expected a non-empty string, an array of strings, an array of "
            "tokens or an array of token arrays.",
            "input",
        )
        tokenizer = tokenizer_for(self.flavour, model)
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise bad
        if all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
            raw = [raw]
        texts: list[str] = []
        tokens = 0
        for item in raw:
            if isinstance(item, str) and item:
                texts.append(item)
                tokens += tokenizer.count(item)
            elif (
                isinstance(item, list)
                and item
                and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
            ):
                texts.append(",".join(map(str, item)))
                tokens += len(item)
            else:
                raise bad
        if self.dialect.dashscope and len(texts) > DASHSCOPE_MAX_EMBEDDING_INPUTS:
            raise self.dialect.invalid(
                f"batch size is invalid, it should not be larger than "
                f"{DASHSCOPE_MAX_EMBEDDING_INPUTS}.",
                "input",
            )
        return texts, tokens

    # --- responses (OpenAI only) ----------------------------------------------------------

    def _responses_messages(self, body: Mapping[str, Any]) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        instructions = body.get("instructions")
        if isinstance(instructions, str) and instructions:
            messages.append({"role": "system", "content": instructions})
        raw = body.get("input")
        if isinstance(raw, str) and raw:
            messages.append({"role": "user", "content": raw})
        elif isinstance(raw, list) and raw:
            for i, item in enumerate(raw):
                if not isinstance(item, dict):
                    raise self.dialect.invalid(f"Invalid 'input[{i}]': expected an object.")
                role = item.get("role", item.get("type", "user"))
                text = message_text(item.get("content", item.get("output", "")))
                messages.append({"role": str(role), "content": text})
        else:
            raise self.dialect.invalid(
                "Invalid 'input': expected a string or an array of input items.", "input"
            )
        return messages

    async def create_response(self, request: Request) -> Response:
        self.dialect.check_key(request, self.settings.api_key)
        body = await read_json_object(request, self.dialect.invalid)
        model = self._model(body)
        messages = self._responses_messages(body)
        max_output = self._max_output(body, "max_output_tokens")
        decision = await self._admit(request, model)
        tokenizer = tokenizer_for("openai", model)
        input_tokens = tokenizer.count_messages(messages)
        reply = self._reply(tokenizer, model, messages, max_output, is_reasoning_model(model))
        response = self.response_object(body, model, reply, input_tokens)
        if body.get("store", True) is not False:
            self.stored[response["id"]] = response
            while len(self.stored) > STORED_RESPONSES:
                self.stored.popitem(last=False)
        if body.get("stream") is True:

            def error_event(sent: int) -> bytes:
                return sse(
                    {
                        "type": "error",
                        "code": "server_error",
                        "message": "The server had an error while processing your request.",
                        "param": None,
                        "sequence_number": sent,
                    },
                    event="error",
                )

            paced = paced_events(
                self.response_events(response, reply),
                decision,
                default_delay_ms=self.settings.chunk_delay_ms,
                error_event=error_event,
            )
            return stream_response(paced, self._headers())
        return json_response(response, headers=self._headers())

    def response_object(
        self, body: Mapping[str, Any], model: str, reply: Reply, input_tokens: int
    ) -> dict[str, Any]:
        response_id = f"resp_{uuid.uuid4().hex}"
        output: list[dict[str, Any]] = []
        if reply.reasoning_tokens:
            output.append({"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": []})
        output.append(
            {
                "type": "message",
                "id": f"msg_{uuid.uuid4().hex}",
                "status": "completed" if reply.finish == "stop" else "incomplete",
                "role": "assistant",
                "content": [
                    {"type": "output_text", "text": reply.text, "annotations": [], "logprobs": []}
                ],
            }
        )
        complete = reply.finish == "stop"
        return {
            "id": response_id,
            "object": "response",
            "created_at": int(self.clock.now().timestamp()),
            "status": "completed" if complete else "incomplete",
            "error": None,
            "incomplete_details": None if complete else {"reason": "max_output_tokens"},
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": body.get("store", True) is not False,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": reply.output_tokens,
                "output_tokens_details": {"reasoning_tokens": reply.reasoning_tokens},
                "total_tokens": input_tokens + reply.output_tokens,
            },
            "user": None,
            "metadata": {},
        }

    def response_events(self, response: dict[str, Any], reply: Reply) -> Iterator[bytes]:
        sequence = itertools.count()

        def event(kind: str, **fields: Any) -> bytes:
            return sse({"type": kind, "sequence_number": next(sequence), **fields}, event=kind)

        started = {**response, "status": "in_progress", "output": [], "usage": None}
        started["incomplete_details"] = None
        yield event("response.created", response=started)
        yield event("response.in_progress", response=started)
        output_index = len(response["output"]) - 1
        message = response["output"][-1]
        for index, item in enumerate(response["output"][:-1]):  # a reasoning item
            yield event("response.output_item.added", output_index=index, item=item)
            yield event("response.output_item.done", output_index=index, item=item)
        item_id = message["id"]
        yield event(
            "response.output_item.added",
            output_index=output_index,
            item={**message, "status": "in_progress", "content": []},
        )
        empty_part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        where = {"item_id": item_id, "output_index": output_index, "content_index": 0}
        yield event("response.content_part.added", **where, part=empty_part)
        for piece in reply.pieces:
            yield event("response.output_text.delta", **where, delta=piece, logprobs=[])
        yield event("response.output_text.done", **where, text=reply.text, logprobs=[])
        yield event("response.content_part.done", **where, part=message["content"][0])
        yield event("response.output_item.done", output_index=output_index, item=message)
        final = "response.completed" if response["status"] == "completed" else "response.incomplete"
        yield event(final, response=response)

    async def get_response(self, request: Request, response_id: str) -> Response:
        self.dialect.check_key(request, self.settings.api_key)
        found = self.stored.get(response_id)
        if found is None:
            raise self.dialect.error(
                404,
                f"Response with id '{response_id}' not found.",
                "invalid_request_error",
                param="response_id",
            )
        return json_response(found)


def default_dimensions(model: str) -> int:
    if "large" in model:
        return 3072
    if model.startswith("text-embedding-v"):
        return 1024
    return 1536


def build_openai_router(emulator: OpenAiEmulator) -> APIRouter:
    """The emulated API's routes at its real paths (`/v1/...` or `/compatible-mode/v1/...`)."""
    dialect = emulator.dialect
    name = "OpenAI" if dialect.flavour == "openai" else "DashScope compatible mode"
    router = APIRouter(prefix=dialect.prefix, tags=[f"{dialect.flavour}-emulator"])
    add = router.add_api_route
    add(
        "/chat/completions",
        emulator.chat_completions,
        methods=["POST"],
        summary=f"{name} Chat Completions (plain, or SSE with stream: true)",
    )
    add("/models", emulator.list_models, methods=["GET"], summary=f"{name} model list")
    add("/models/{model}", emulator.get_model, methods=["GET"], summary=f"One {name} model")
    add("/embeddings", emulator.embeddings, methods=["POST"], summary=f"{name} embeddings")
    if dialect.flavour == "openai":
        add(
            "/responses",
            emulator.create_response,
            methods=["POST"],
            summary="OpenAI Responses API (plain, or SSE events through response.completed)",
        )
        add(
            "/responses/{response_id}",
            emulator.get_response,
            methods=["GET"],
            summary="A stored response",
        )
    return router
