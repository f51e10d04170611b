"""`POST /v1/responses` (issue 12): OpenAI's Responses API, metered on the ledger as chat is.

- OpenAI: served natively (`<base>/responses`, plain and streamed), the body passed on with
  the catalogue's upstream model and a `max_output_tokens` the reservation covers.
- Qwen and Gemini: translated to the chat path (instructions and input items -> messages,
  function tools -> chat tools), and the chat answer (or its chunks) back to a Response (or to
  the Responses event sequence: response.created, response.in_progress, output_item.added,
  content_part.added, output_text.delta…, output_text.done, content_part.done,
  output_item.done, response.completed).

Metering: the input is counted offline as chat messages and reserved with the output
allowance (`max_output_tokens`, else the model's limit); the call settles to the usage the
provider reports (`input_tokens`/`output_tokens`; in a stream, the one on `response.completed`,
settled before that event reaches the client) and, for a stream that broke off or lost its
client, to the input plus the text already streamed (estimated). Nothing is charged twice:
the settlement is MeteredStream's one settlement.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
import orjson

from leaky_tokens.shared.clock import Clock
from leaky_tokens.shared.database import Database
from leaky_tokens.shared.principal import Principal
from leaky_tokens.shared.tokenizer import message_text
from leaky_tokens.tokens.inference.adapters import (
    Adapter,
    ChatStream,
    Endpoint,
    ProviderHttp,
    openai_error_of,
    sse_data,
)
from leaky_tokens.tokens.inference.catalogue import Catalogue, ModelRoute
from leaky_tokens.tokens.inference.errors import InvalidInferenceRequest, ResponseNotFound
from leaky_tokens.tokens.inference.service import (
    Admission,
    ChatRequest,
    InferenceService,
    MeteredStream,
    provider_http_error,
)
from leaky_tokens.tokens.inference.wire import ChatCall, ProviderError, Usage, usage_from_openai
from leaky_tokens.tokens.response_repository import StoredResponses

log = logging.getLogger("leaky_tokens.tokens.inference.responses")
TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
INPUT_ROLES = frozenset({"user", "system", "developer", "assistant"})


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    """A parsed /v1/responses body."""

    route: ModelRoute
    body: dict[str, Any]  # as the client sent it (passed on natively to OpenAI)
    messages: list[dict[str, Any]]  # the input as chat messages (counted; sent translated)
    max_output: int | None
    stream: bool
    chat_options: dict[str, Any]  # the chat parameters the translation sends


def _invalid(message: str, param: str | None) -> InvalidInferenceRequest:
    details = [{"field": param, "message": message}] if param else None
    return InvalidInferenceRequest(message, details=details)


def input_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """`instructions` and `input` (a string, or message / function_call /
    function_call_output items) as chat messages."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _invalid("Invalid 'instructions': expected a string.", "instructions")
    if instructions:
        messages.append({"role": "system", "content": instructions})
    raw = body.get("input")
    if isinstance(raw, str) and raw:
        messages.append({"role": "user", "content": raw})
        return messages
    if not isinstance(raw, list) or not raw:
        raise _invalid("Invalid 'input': expected a string or an array of input items.", "input")
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise _invalid(f"Invalid 'input[{i}]': expected an object.", "input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in INPUT_ROLES:
                raise _invalid(f"Invalid value for 'input[{i}].role'.", "input")
            messages.append({"role": role, "content": message_text(item.get("content", ""))})
        elif kind == "function_call":
            call = {
                "id": str(item.get("call_id") or item.get("id") or f"call_{i}"),
                "type": "function",
                "function": {
                    "name": str(item.get("name") or ""),
                    "arguments": str(item.get("arguments") or ""),
                },
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": str(item.get("call_id") or ""),
                    "content": output if isinstance(output, str) else message_text(output),
                }
            )
        elif kind == "reasoning":
            continue  # a previous turn's reasoning summary: nothing to send on
        else:
            raise _invalid(f"Invalid 'input[{i}]': unsupported item type '{kind}'.", "input")
    if not any(m["role"] != "system" for m in messages):
        raise _invalid("Invalid 'input': expected at least one input item.", "input")
    return messages


def chat_tools(tools: Any) -> list[dict[str, Any]]:
    """Responses function tools as chat tools; other kinds cannot be translated."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _invalid("Invalid 'tools': expected an array.", "tools")
    translated = []
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise _invalid("Only function tools are supported for this model.", "tools")
        function = {
            k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool
        }
        translated.append({"type": "function", "function": function})
    return translated


def chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def parse_responses_request(body: Any, catalogue: Catalogue) -> ResponsesRequest:
    if not isinstance(body, dict):
        raise _invalid("The request body must be a JSON object.", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("you must provide a model parameter", "model")
    messages = input_messages(body)
    max_output = body.get("max_output_tokens")
    if max_output is not None and (
        isinstance(max_output, bool) or not isinstance(max_output, int) or max_output < 1
    ):
        raise _invalid(
            "Invalid 'max_output_tokens': integer below minimum value. Expected a value >= 1.",
            "max_output_tokens",
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("Invalid 'stream': expected a boolean.", "stream")
    if body.get("previous_response_id") is not None:
        raise _invalid(
            "'previous_response_id' is not supported by this gateway: send the conversation "
            "as input items.",
            "previous_response_id",
        )
    route = catalogue.resolve_for(model, "chat")
    options: dict[str, Any] = {}
    if route.provider == "openai" and body.get("tools"):
        options["tools"] = body["tools"]  # counted into the reservation; sent natively as is
    if route.provider != "openai":
        tools = chat_tools(body.get("tools"))
        if tools:
            options["tools"] = tools
            if body.get("tool_choice") is not None:
                options["tool_choice"] = chat_tool_choice(body["tool_choice"])
            if body.get("parallel_tool_calls") is not None:
                options["parallel_tool_calls"] = body["parallel_tool_calls"]
        for name in ("temperature", "top_p", "user"):
            if body.get(name) is not None:
                options[name] = body[name]
    return ResponsesRequest(route, body, messages, max_output, stream, options)


# --- Response objects ------------------------------------------------------------------------


def usage_from_responses(value: Any) -> Usage | None:
    """A Responses `usage` object ({input_tokens, output_tokens, …}); None if absent."""
    if not isinstance(value, dict):
        return None
    prompt, completion = value.get("input_tokens"), value.get("output_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    out_details = value.get("output_tokens_details")
    in_details = value.get("input_tokens_details")
    reasoning = out_details.get("reasoning_tokens") if isinstance(out_details, dict) else 0
    cached = in_details.get("cached_tokens") if isinstance(in_details, dict) else 0
    return Usage(
        max(0, prompt),
        max(0, completion),
        reasoning if isinstance(reasoning, int) else 0,
        cached if isinstance(cached, int) else 0,
    )


def responses_usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def response_object(
    request: ResponsesRequest,
    *,
    response_id: str,
    created_at: int,
    status: str,
    output: list[dict[str, Any]],
    usage: Usage | None,
    incomplete_reason: str | None = None,
) -> dict[str, Any]:
    body = request.body
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": request.route.id,
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,  # translated answers are not stored
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": responses_usage(usage) if usage is not None else None,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def function_call_item(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": f"fc_{uuid.uuid4().hex}",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": "completed",
    }


def _status_of(finish: str | None) -> tuple[str, str | None]:
    if finish == "length":
        return "incomplete", "max_output_tokens"
    if finish == "content_filter":
        return "incomplete", "content_filter"
    return "completed", None


def response_from_chat(
    request: ResponsesRequest, completion: dict[str, Any], usage: Usage | None
) -> dict[str, Any]:
    """A Response for a chat.completion (the translated providers)."""
    choices = completion.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    text = message_text(message.get("content") or "")
    output: list[dict[str, Any]] = []
    calls = message.get("tool_calls") or []
    if text or not calls:
        output.append(message_item(f"msg_{uuid.uuid4().hex}", text))
    for call in calls:
        function = call.get("function") or {}
        output.append(
            function_call_item(
                str(call.get("id") or f"call_{uuid.uuid4().hex}"),
                str(function.get("name") or ""),
                str(function.get("arguments") or ""),
            )
        )
    status, reason = _status_of(choice.get("finish_reason"))
    return response_object(
        request,
        response_id=f"resp_{uuid.uuid4().hex}",
        created_at=int(completion.get("created") or time.time()),
        status=status,
        output=output,
        usage=usage,
        incomplete_reason=reason,
    )


def output_text(response: dict[str, Any]) -> str:
    pieces = []
    for item in response.get("output") or ():
        if isinstance(item, dict) and item.get("type") == "message":
            pieces.append(message_text(item.get("content") or ""))
        elif isinstance(item, dict) and item.get("type") == "function_call":
            pieces.append(str(item.get("arguments") or ""))
    return "".join(pieces)


# --- streams ---------------------------------------------------------------------------------


class TranslatedResponseStream:
    """A chat stream (Qwen, Gemini) as Responses events; its usage is the chat stream's."""

    def __init__(self, chat: ChatStream, request: ResponsesRequest) -> None:
        self._chat = chat
        self._request = request
        self._id = f"resp_{uuid.uuid4().hex}"
        self._created = int(time.time())

    @property
    def usage(self) -> Usage | None:
        return self._chat.usage

    async def aclose(self) -> None:
        await self._chat.aclose()

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        sequence = itertools.count()
        request = self._request

        def event(kind: str, **fields: Any) -> dict[str, Any]:
            return {"type": kind, "sequence_number": next(sequence), **fields}

        def snapshot(status: str, output: list[dict[str, Any]], reason: str | None = None) -> Any:
            usage = self._chat.usage if status != "in_progress" else None
            return response_object(
                request,
                response_id=self._id,
                created_at=self._created,
                status=status,
                output=output,
                usage=usage,
                incomplete_reason=reason,
            )

        yield event("response.created", response=snapshot("in_progress", []))
        yield event("response.in_progress", response=snapshot("in_progress", []))
        message_id = f"msg_{uuid.uuid4().hex}"
        where = {"item_id": message_id, "output_index": 0, "content_index": 0}
        empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        text: list[str] = []
        started = False
        calls: dict[int, dict[str, str]] = {}
        finish: str | None = None
        async for chunk in self._chat.chunks():
            for choice in chunk.get("choices") or ():
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta") or {}
                piece = delta.get("content")
                if isinstance(piece, str) and piece:
                    if not started:
                        started = True
                        item = {**message_item(message_id, "", "in_progress"), "content": []}
                        yield event("response.output_item.added", output_index=0, item=item)
                        yield event("response.content_part.added", **where, part=empty)
                    text.append(piece)
                    yield event("response.output_text.delta", **where, delta=piece, logprobs=[])
                for call in delta.get("tool_calls") or ():
                    if not isinstance(call, dict):
                        continue
                    slot = calls.setdefault(
                        int(call.get("index") or 0), {"id": "", "name": "", "arguments": ""}
                    )
                    function = call.get("function") or {}
                    slot["id"] = slot["id"] or str(call.get("id") or "")
                    slot["name"] += str(function.get("name") or "")
                    slot["arguments"] += str(function.get("arguments") or "")
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        output: list[dict[str, Any]] = []
        if started or not calls:
            if not started:
                item = {**message_item(message_id, "", "in_progress"), "content": []}
                yield event("response.output_item.added", output_index=0, item=item)
                yield event("response.content_part.added", **where, part=empty)
            whole = "".join(text)
            done = message_item(message_id, whole)
            yield event("response.output_text.done", **where, text=whole, logprobs=[])
            yield event("response.content_part.done", **where, part=done["content"][0])
            yield event("response.output_item.done", output_index=0, item=done)
            output.append(done)
        for _, slot in sorted(calls.items()):
            index = len(output)
            item = function_call_item(
                slot["id"] or f"call_{uuid.uuid4().hex}", slot["name"], slot["arguments"]
            )
            yield event(
                "response.output_item.added",
                output_index=index,
                item={**item, "status": "in_progress", "arguments": ""},
            )
            yield event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                arguments=item["arguments"],
            )
            yield event("response.output_item.done", output_index=index, item=item)
            output.append(item)
        status, reason = _status_of(finish)
        final = "response.completed" if status == "completed" else "response.incomplete"
        yield event(final, response=snapshot(status, output, reason))


class NativeResponseStream:
    """OpenAI's own Responses SSE, passed on event by event (the catalogue's model id shown);
    its usage is the one on the terminal event. Ends at response.completed / .incomplete /
    .failed; an `error` event, or an end before a terminal event, is a cut."""

    def __init__(self, response: aiohttp.ClientResponse, model: str, idle: float) -> None:
        self._response = response
        self._model = model
        self._idle = idle
        self._usage: Usage | None = None

    @property
    def usage(self) -> Usage | None:
        return self._usage

    async def aclose(self) -> None:
        self._response.close()

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        async for data in sse_data(self._response, self._idle):
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise ProviderError("cut", "the provider streamed something not JSON") from None
            if not isinstance(event, dict):
                continue
            kind = event.get("type")
            if kind == "error":
                raise ProviderError("cut", str(event.get("message") or "the stream failed"))
            response = event.get("response")
            if isinstance(response, dict):
                response["model"] = self._model
                usage = usage_from_responses(response.get("usage"))
                if usage is not None:
                    self._usage = usage
            yield event
            if kind in TERMINAL_EVENTS:
                return
        raise ProviderError("cut", "the provider's stream ended before response.completed")


def sse_event(event: dict[str, Any]) -> bytes:
    kind = str(event.get("type") or "message").encode()
    return b"event: " + kind + b"\ndata: " + orjson.dumps(event) + b"\n\n"


class MeteredResponseStream(MeteredStream):
    """MeteredStream's one settlement, over Responses events: text deltas are what a cut
    stream is charged for, and the terminal event reaches the client only once settled.
    `completed(response)` runs (shielded) once the terminal response is known."""

    def __init__(
        self,
        service: InferenceService,
        admission: Admission,
        stream: ChatStream,
        *,
        completed: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(service, admission, stream, include_usage=True)
        self._completed = completed

    async def events(self) -> AsyncIterator[bytes]:
        sent = 0
        try:
            async for event in self._stream.chunks():
                kind = event.get("type")
                if kind == "response.output_text.delta" or (
                    kind == "response.function_call_arguments.delta"
                ):
                    delta = event.get("delta")
                    if isinstance(delta, str):
                        self._pieces.append(delta)
                elif kind == "response.function_call_arguments.done":
                    arguments = event.get("arguments")
                    if isinstance(arguments, str):
                        self._pieces.append(arguments)
                if kind in TERMINAL_EVENTS:
                    response = event.get("response")
                    if isinstance(response, dict) and isinstance(response.get("id"), str):
                        self._response_id = response["id"]
                    if kind != "response.failed":
                        self._outcome = "completed"
                    else:
                        self._outcome = "provider_failed"
                    await asyncio.shield(self._settle())
                    if self._completed is not None and isinstance(response, dict):
                        await asyncio.shield(self._completed(response))
                sequence = event.get("sequence_number")
                if isinstance(sequence, int):
                    sent = sequence + 1
                yield sse_event(event)
        except ProviderError as exc:
            self._outcome = "provider_cut"
            await asyncio.shield(self._settle())
            yield sse_event(
                {
                    "type": "error",
                    "code": "provider_stream_cut",
                    "message": f"The provider's stream broke off: {exc.message}",
                    "param": None,
                    "sequence_number": sent,
                }
            )


# --- the service -----------------------------------------------------------------------------


def owner_of(principal: Principal) -> str:
    return f"user:{principal.user_id}"


class ResponsesService:
    def __init__(
        self,
        inference: InferenceService,
        openai: Endpoint,
        http: ProviderHttp,
        database: Database,
        clock: Clock,
    ) -> None:
        self.inference = inference
        self.openai = openai
        self.http = http
        self.database = database
        self.clock = clock
        self.url = f"{openai.base_url}/responses"
        self.headers = {"authorization": f"Bearer {openai.api_key}", "accept": "*/*"}

    # --- stored responses (OpenAI's store, passed on only to the caller that created one) ---

    async def _remember(self, principal: Principal, request: ResponsesRequest, body: Any) -> None:
        response_id = body.get("id") if isinstance(body, dict) else None
        if not isinstance(response_id, str) or not response_id:
            return
        if body.get("store") is False or request.body.get("store") is False:
            return
        now = self.clock.now()
        ttl = timedelta(seconds=self.inference.settings.stored_response_ttl_seconds)
        try:
            async with self.database.connection() as conn:
                await StoredResponses(conn).remember(
                    response_id[:128], owner_of(principal), request.route.id, now, now + ttl
                )
        except Exception:
            log.exception("could not record a stored response's owner")

    async def retrieve(self, principal: Principal, response_id: str) -> dict[str, Any]:
        """The caller's own stored response, fetched from OpenAI; else 404."""
        async with self.database.read() as db:
            model = await StoredResponses(db).model_of(
                response_id, owner_of(principal), self.clock.now()
            )
        if model is None:
            raise ResponseNotFound(
                f"Response with id '{response_id}' not found. Only responses created through "
                "this gateway by you on a model that stores them (OpenAI, `store` not false) "
                "can be retrieved.",
                details=[{"field": "response_id", "message": "not found"}],
            )
        deadline = self._deadline()
        try:
            # The adapters' one pooled session (a GET: `send` only posts).
            client = self.http._open()
            async with asyncio.timeout_at(deadline):
                answer = await client.get(f"{self.url}/{response_id}", headers=self.headers)
            status, headers = answer.status, answer.headers
            body = await self.http.read_json(answer, deadline)
        except (TimeoutError, aiohttp.ClientError):
            raise provider_http_error(
                ProviderError("failed", "the provider is unreachable")
            ) from None
        except ProviderError as exc:
            raise provider_http_error(exc) from None
        if status == 404:
            raise ResponseNotFound(f"Response with id '{response_id}' not found at the provider.")
        if status != 200 or not isinstance(body, dict):
            raise provider_http_error(openai_error_of(status, body, headers))
        body["model"] = model
        return body

    async def sweep_forever(self) -> None:
        while True:
            try:
                async with self.database.connection() as conn:
                    await StoredResponses(conn).forget_expired(self.clock.now())
            except Exception:
                log.exception("stored response sweep failed")
            await asyncio.sleep(self.inference.settings.idempotency_sweep_seconds)

    def _chat(self, request: ResponsesRequest) -> ChatRequest:
        return ChatRequest(
            request.route,
            request.messages,
            request.max_output,
            request.stream,
            True,  # translated streams need the usage chunk for response.completed
            request.chat_options,
        )

    def _native_payload(self, request: ResponsesRequest, max_tokens: int) -> dict[str, Any]:
        payload = dict(request.body)
        payload["model"] = request.route.upstream_model
        payload["max_output_tokens"] = max_tokens
        payload["stream"] = request.stream
        return payload

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.http.settings.timeout_seconds

    async def create(
        self, principal: Principal, request: ResponsesRequest, request_id: str | None
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """A whole Response and the headers that go with it."""
        inference = self.inference
        if request.route.provider != "openai":
            completion, headers = await inference.complete(
                principal, self._chat(request), request_id
            )
            usage = usage_from_openai(completion.get("usage"))
            return response_from_chat(request, completion, usage), headers
        admission = await inference.admit(principal, self._chat(request), request_id)
        try:
            try:
                deadline = self._deadline()
                answer = await self.http.send(
                    "openai",
                    self.url,
                    self.headers,
                    self._native_payload(request, admission.max_tokens),
                    openai_error_of,
                    deadline=deadline,
                )
                body = await self.http.read_json(answer, deadline)
                if not isinstance(body, dict) or not isinstance(body.get("output"), list):
                    raise ProviderError("failed", "the provider answered an unexpected body")
            except ProviderError as exc:
                await inference._refund(admission, "PROVIDER_FAILURE", {"reason": exc.message})
                raise provider_http_error(exc) from None
            body["model"] = request.route.id
            usage = usage_from_responses(body.get("usage"))
            estimated = usage is None
            if usage is None:
                usage = Usage(
                    admission.prompt_estimate, admission.tokenizer.count(output_text(body))
                )
                body["usage"] = responses_usage(usage)
            charged = await inference.settle(
                admission,
                usage,
                estimated=estimated,
                outcome="completed",
                response_id=str(body.get("id") or "") or None,
            )
            await self._remember(principal, request, body)
            return body, admission.rate_limit_headers(charged)
        finally:
            if not admission.settled:
                await asyncio.shield(inference._refund(admission, "ABANDONED", {}))

    async def open_stream(
        self, principal: Principal, request: ResponsesRequest, request_id: str | None
    ) -> MeteredResponseStream:
        """A provider stream already open (so failures before output are HTTP errors)."""
        inference = self.inference
        chat = self._chat(request)
        admission = await inference.admit(principal, chat, request_id)
        stream: ChatStream
        try:
            if request.route.provider == "openai":
                response = await self.http.send(
                    "openai",
                    self.url,
                    self.headers,
                    self._native_payload(request, admission.max_tokens),
                    openai_error_of,
                    deadline=self._deadline(),
                )
                stream = NativeResponseStream(
                    response, request.route.id, self.http.settings.stream_idle_seconds
                )
            else:
                adapter: Adapter = inference.adapters[request.route.provider]
                call = ChatCall(
                    request.route, request.messages, admission.max_tokens, True, chat.options
                )
                stream = TranslatedResponseStream(await adapter.open_stream(call), request)
        except ProviderError as exc:
            await inference._refund(admission, "PROVIDER_FAILURE", {"reason": exc.message})
            raise provider_http_error(exc) from None
        except BaseException:
            await asyncio.shield(inference._refund(admission, "ABANDONED", {}))
            raise

        async def completed(response: dict[str, Any]) -> None:
            await self._remember(principal, request, response)

        native = request.route.provider == "openai"
        return MeteredResponseStream(
            inference, admission, stream, completed=completed if native else None
        )
