"""The provider adapters of the /v1 API: each speaks its provider's real API (base URL and key
from settings, so a real provider is a change of setting) and answers in OpenAI's terms.

- OpenAI: Chat Completions at `<base>/chat/completions` (`max_completion_tokens`).
- Qwen: DashScope's OpenAI-compatible mode at `<base>/chat/completions` (`max_tokens`); its
  quirks are smoothed: `finish_reason: ""` on content chunks reads as null.
- Gemini: native `<base>/models/{model}:generateContent` and `:streamGenerateContent?alt=sse`,
  translated both ways (gemini.py).

Streams always ask for usage (`stream_options.include_usage`); the service decides what the
client sees.

Retries never bill twice: a call is tried again only when nothing reached the provider (the
connection was refused, or could not be made in time) or when it answered 429/503 with a retry
hint no longer than `max_retry_wait_seconds` (it did no work). A call that was sent and then
timed out or broke is never repeated. Keys go in headers only, and no message built here
carries a URL or a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson

from leaky_tokens.settings import PROVIDERS, InferenceSettings, Settings
from leaky_tokens.shared.circuit_breaker import BreakerConfig, CircuitBreaker, CircuitOpenError
from leaky_tokens.shared.clock import Clock
from leaky_tokens.shared.outbound import client_session
from leaky_tokens.tokens.inference import gemini
from leaky_tokens.tokens.inference.wire import (
    ChatCall,
    FailureKind,
    ProviderError,
    Usage,
    usage_from_openai,
)

MAX_ANSWER_BYTES = 8 * 1024 * 1024
_DONE = b"[DONE]"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where one provider is reached; `api_key` is a secret (repr hides it)."""

    provider: str
    base_url: str
    api_key: str

    def __repr__(self) -> str:
        return f"Endpoint(provider={self.provider!r}, base_url={self.base_url!r})"


STUB_PATHS = {"openai": "/v1", "qwen": "/compatible-mode/v1", "gemini": "/v1beta"}


def endpoints_from_settings(settings: Settings) -> dict[str, Endpoint]:
    """Each provider's base URL and key: the configured ones, else the stub's."""
    found: dict[str, Endpoint] = {}
    for provider in PROVIDERS:
        configured = settings.inference.providers.get(provider)
        base = configured.base_url.rstrip("/") if configured and configured.base_url else ""
        key = configured.api_key.get_secret_value() if configured else ""
        if not base:
            base = settings.url_of(provider) + STUB_PATHS[provider]
            key = key or settings.stubs.api_key or "leaky-tokens-stub"
        found[provider] = Endpoint(provider, base, key)
    return found


@dataclass(frozen=True, slots=True)
class Completion:
    body: dict[str, Any]  # an OpenAI chat.completion
    usage: Usage | None  # None: the provider reported none


class ChatStream(Protocol):
    """An open provider stream as OpenAI chunks. Iteration ends normally only at the stream's
    proper end; a cut or an error event raises ProviderError."""

    def chunks(self) -> AsyncIterator[dict[str, Any]]: ...

    @property
    def usage(self) -> Usage | None: ...

    async def aclose(self) -> None: ...


class Adapter(Protocol):
    async def complete(self, call: ChatCall) -> Completion: ...

    async def open_stream(self, call: ChatCall) -> ChatStream: ...


# --- the HTTP part every adapter shares ------------------------------------------------------


def retry_hint_seconds(headers: Mapping[str, str]) -> float | None:
    """`retry-after-ms`, else `Retry-After` in seconds (the forms OpenAI's SDK reads)."""
    value = headers.get("retry-after-ms")
    if value:
        with contextlib.suppress(ValueError):
            return max(0.0, float(value) / 1000)
    value = headers.get("retry-after")
    if value:
        with contextlib.suppress(ValueError):
            return max(0.0, float(value))
    return None


def openai_error_of(status: int, body: Any, headers: Mapping[str, str]) -> ProviderError:
    """Our ProviderError for an OpenAI-style (or DashScope flat) error answer. A provider's
    429 is always a transient rate limit here, whatever it calls itself (DashScope words a
    per-minute throttle as `insufficient_quota`); our own quota errors are ours alone."""
    inner = body.get("error") if isinstance(body, dict) else None
    if not isinstance(inner, dict):
        inner = body if isinstance(body, dict) else {}
    message = str(inner.get("message") or f"the provider answered {status}")
    param = inner.get("param") if isinstance(inner.get("param"), str) else None
    kind: FailureKind
    if status == 429:
        kind = "rate_limited"
    elif status == 503:
        kind = "unavailable"
    elif status == 504:
        kind = "timeout"
    elif status in (401, 403):
        kind, message = "failed", "the provider refused the gateway's credentials"
    elif 400 <= status < 500:
        kind = "rejected"
    else:
        kind = "failed"
    return ProviderError(
        kind, message, status=status, retry_after_seconds=retry_hint_seconds(headers), param=param
    )


ErrorReader = Callable[[int, Any, Mapping[str, str]], ProviderError]


def _gemini_error(status: int, body: Any, headers: Mapping[str, str]) -> ProviderError:
    error = gemini.error_of(status, body)
    if error.retry_after_seconds is None:
        error.retry_after_seconds = retry_hint_seconds(headers)
    return error


def _is_outage(exc: BaseException) -> bool:
    """What counts against a provider's breaker: no answer, or one saying it is down; a
    rejected request or a throttle is the provider working."""
    return isinstance(exc, ProviderError) and exc.kind in ("failed", "unavailable", "timeout")


class ProviderHttp:
    """One pooled aiohttp session for every provider, with the retry rule above, and a circuit
    breaker per provider around opening a call (an open one answers 503 at once)."""

    def __init__(
        self,
        settings: InferenceSettings,
        breaker: BreakerConfig | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._breakers = {
            provider: CircuitBreaker(f"inference-{provider}", breaker or BreakerConfig(), clock)
            for provider in PROVIDERS
        }

    def breaker_snapshots(self) -> dict[str, dict[str, Any]]:
        return {name: breaker.snapshot() for name, breaker in self._breakers.items()}

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = client_session(
                max_connections=self.settings.max_connections,
                connect_seconds=self.settings.connect_timeout_seconds,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self,
        provider: str,
        url: str,
        headers: dict[str, str],
        payload: dict[str, Any],
        errors: ErrorReader,
        *,
        deadline: float,
    ) -> aiohttp.ClientResponse:
        """POST `payload`; the open 2xx answer (its headers in), or ProviderError. The caller
        reads the body and releases the answer."""
        breaker = self._breakers[provider]
        try:
            return await breaker.call(
                lambda: self._send(url, headers, payload, errors, deadline=deadline), _is_outage
            )
        except CircuitOpenError as exc:
            raise ProviderError(
                "unavailable",
                "the provider keeps failing; its circuit breaker is open",
                retry_after_seconds=exc.retry_after_seconds,
            ) from None

    async def _send(
        self,
        url: str,
        headers: dict[str, str],
        payload: dict[str, Any],
        errors: ErrorReader,
        *,
        deadline: float,
    ) -> aiohttp.ClientResponse:
        session = self._open()
        data = orjson.dumps(payload)
        headers = {**headers, "content-type": "application/json"}
        attempts = self.settings.attempts
        loop = asyncio.get_running_loop()
        for attempt in range(1, attempts + 1):
            try:
                async with asyncio.timeout_at(deadline):
                    response = await session.post(
                        url, data=data, headers=headers, allow_redirects=False
                    )
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
                # Nothing reached the provider: another try cannot bill twice.
                if attempt < attempts and loop.time() < deadline:
                    await asyncio.sleep(min(0.05 * attempt, max(0.0, deadline - loop.time())))
                    continue
                raise ProviderError("failed", "the provider is unreachable") from None
            except TimeoutError:
                raise ProviderError("timeout", "the provider did not answer in time") from None
            except aiohttp.ClientError:
                raise ProviderError("failed", "the provider's answer broke off") from None
            if 200 <= response.status < 300:
                return response
            try:
                async with asyncio.timeout_at(deadline):
                    raw = await read_body(response, MAX_ANSWER_BYTES)
            except (TimeoutError, aiohttp.ClientError, ProviderError):
                raw = b""
            finally:
                response.release()
            try:
                body = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                body = None
            error = errors(response.status, body, response.headers)
            hint = error.retry_after_seconds
            if (
                error.kind in ("rate_limited", "unavailable")
                and hint is not None
                and hint <= self.settings.max_retry_wait_seconds
                and attempt < attempts
                and loop.time() + hint < deadline
            ):
                await asyncio.sleep(hint)  # the provider did no work: safe to ask again
                continue
            raise error
        raise AssertionError("unreachable")  # the loop always returns or raises

    async def read_json(self, response: aiohttp.ClientResponse, deadline: float) -> Any:
        try:
            async with asyncio.timeout_at(deadline):
                raw = await read_body(response, MAX_ANSWER_BYTES)
        except TimeoutError:
            raise ProviderError("timeout", "the provider did not answer in time") from None
        except aiohttp.ClientError:
            raise ProviderError("failed", "the provider's answer broke off") from None
        finally:
            response.release()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ProviderError("failed", "the provider answered something not JSON") from None


async def read_body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, at most `limit` bytes (`content.read(n)` returns only what is buffered
    already, which for a body in several TCP segments is not all of it)."""
    blocks: list[bytes] = []
    size = 0
    while block := await response.content.readany():
        size += len(block)
        if size > limit:
            raise ProviderError("failed", "the provider's answer is too large")
        blocks.append(block)
    return b"".join(blocks)


async def sse_data(response: aiohttp.ClientResponse, idle_seconds: float) -> AsyncIterator[bytes]:
    """The `data` of each server-sent event (multi-line data joined), as it arrives. Ends at the
    end of the body; raises ProviderError("cut") when the body breaks off, or when nothing
    arrives for `idle_seconds`."""
    lines: list[bytes] = []
    content = response.content
    while True:
        try:
            async with asyncio.timeout(idle_seconds):
                line = await content.readline()
        except TimeoutError:
            raise ProviderError("cut", "the provider's stream stalled") from None
        except aiohttp.ClientError:
            raise ProviderError("cut", "the provider's stream broke off") from None
        if not line:
            if lines:
                yield b"\n".join(lines)
            return
        line = line.rstrip(b"\r\n")
        if not line:
            if lines:
                yield b"\n".join(lines)
                lines = []
            continue
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)


# --- OpenAI and DashScope compatible mode -------------------------------------------------------

# Parameters the adapters set themselves (the rest of the client's body passes on).
OWN_PARAMETERS = frozenset(
    {"model", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options"}
)


class OpenAiCompatibleAdapter:
    """OpenAI's Chat Completions, or DashScope's compatible mode of it (`dashscope=True`)."""

    def __init__(self, endpoint: Endpoint, http: ProviderHttp, *, dashscope: bool) -> None:
        self.endpoint = endpoint
        self.http = http
        self.dashscope = dashscope
        self.url = f"{endpoint.base_url}/chat/completions"
        self.headers = {"authorization": f"Bearer {endpoint.api_key}", "accept": "*/*"}

    def _payload(self, call: ChatCall) -> dict[str, Any]:
        payload: dict[str, Any] = {k: v for k, v in call.options.items() if k not in OWN_PARAMETERS}
        payload["model"] = call.route.upstream_model
        payload["messages"] = call.messages
        payload["max_tokens" if self.dashscope else "max_completion_tokens"] = call.max_tokens
        if call.stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        return payload

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.http.settings.timeout_seconds

    async def complete(self, call: ChatCall) -> Completion:
        deadline = self._deadline()
        response = await self.http.send(
            self.endpoint.provider,
            self.url,
            self.headers,
            self._payload(call),
            openai_error_of,
            deadline=deadline,
        )
        body = await self.http.read_json(response, deadline)
        if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
            raise ProviderError("failed", "the provider answered an unexpected body")
        body["model"] = call.route.id
        for choice in body["choices"]:
            if isinstance(choice, dict) and choice.get("finish_reason") == "":
                choice["finish_reason"] = "stop"
        return Completion(body, usage_from_openai(body.get("usage")))

    async def open_stream(self, call: ChatCall) -> ChatStream:
        response = await self.http.send(
            self.endpoint.provider,
            self.url,
            self.headers,
            self._payload(call),
            openai_error_of,
            deadline=self._deadline(),
        )
        return _OpenAiStream(response, call.route.id, self.http.settings.stream_idle_seconds)


class _OpenAiStream:
    def __init__(self, response: aiohttp.ClientResponse, model: str, idle: float) -> None:
        self._response = response
        self._model = model
        self._idle = idle
        self._usage: Usage | None = None

    @property
    def usage(self) -> Usage | None:
        return self._usage

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        async for data in sse_data(self._response, self._idle):
            if data == _DONE:
                return
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise ProviderError("cut", "the provider streamed something not JSON") from None
            if not isinstance(chunk, dict):
                continue
            if chunk.get("error"):
                error = chunk["error"]
                message = error.get("message") if isinstance(error, dict) else None
                raise ProviderError("cut", str(message or "the provider's stream failed"))
            usage = usage_from_openai(chunk.get("usage"))
            if usage is not None:
                self._usage = usage  # the last report counts, never a sum
            chunk["model"] = self._model
            for choice in chunk.get("choices") or ():
                if isinstance(choice, dict) and choice.get("finish_reason") == "":
                    choice["finish_reason"] = None  # DashScope's "" on content chunks
            yield chunk
        raise ProviderError("cut", "the provider's stream ended without [DONE]")

    async def aclose(self) -> None:
        self._response.close()  # not reused: the rest of the stream may still be coming


# --- Gemini native ----------------------------------------------------------------------------


class GeminiAdapter:
    def __init__(self, endpoint: Endpoint, http: ProviderHttp) -> None:
        self.endpoint = endpoint
        self.http = http
        self.headers = {"x-goog-api-key": endpoint.api_key, "accept": "*/*"}

    def _url(self, call: ChatCall, method: str) -> str:
        return f"{self.endpoint.base_url}/models/{call.route.upstream_model}:{method}"

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.http.settings.timeout_seconds

    async def complete(self, call: ChatCall) -> Completion:
        deadline = self._deadline()
        response = await self.http.send(
            self.endpoint.provider,
            self._url(call, "generateContent"),
            self.headers,
            gemini.to_request(call),
            _gemini_error,
            deadline=deadline,
        )
        body = await self.http.read_json(response, deadline)
        if not isinstance(body, dict):
            raise ProviderError("failed", "the provider answered an unexpected body")
        completion, usage = gemini.to_completion(
            body, model=call.route.id, created=int(time.time())
        )
        return Completion(completion, usage)

    async def open_stream(self, call: ChatCall) -> ChatStream:
        response = await self.http.send(
            self.endpoint.provider,
            self._url(call, "streamGenerateContent") + "?alt=sse",
            self.headers,
            gemini.to_request(call),
            _gemini_error,
            deadline=self._deadline(),
        )
        return _GeminiStream(response, call.route.id, self.http.settings.stream_idle_seconds)


class _GeminiStream:
    def __init__(self, response: aiohttp.ClientResponse, model: str, idle: float) -> None:
        self._response = response
        self._model = model
        self._idle = idle
        self._usage: Usage | None = None
        self._id = f"chatcmpl-{uuid.uuid4().hex}"
        self._created = int(time.time())

    @property
    def usage(self) -> Usage | None:
        return self._usage

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        first = True
        finished = False
        async for data in sse_data(self._response, self._idle):
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise ProviderError("cut", "the provider streamed something not JSON") from None
            if isinstance(event, list) or (isinstance(event, dict) and "error" in event):
                raise ProviderError("cut", gemini.error_of(500, event).message)
            if not isinstance(event, dict):
                continue
            chunks, usage, done = gemini.stream_state_chunks(
                event, completion_id=self._id, model=self._model, created=self._created, first=first
            )
            first = False
            if usage is not None:
                self._usage = usage  # the last report counts (early ones lack candidates)
            for chunk in chunks:
                yield chunk
            finished = finished or done
        if not finished:
            raise ProviderError("cut", "the provider's stream ended before its finish reason")
        if self._usage is not None:
            yield {
                "id": self._id,
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": self._model,
                "choices": [],
                "usage": self._usage.as_openai(),
            }

    async def aclose(self) -> None:
        self._response.close()


def build_adapters(settings: Settings, http: ProviderHttp) -> dict[str, Adapter]:
    endpoints = endpoints_from_settings(settings)
    return {
        "openai": OpenAiCompatibleAdapter(endpoints["openai"], http, dashscope=False),
        "qwen": OpenAiCompatibleAdapter(endpoints["qwen"], http, dashscope=True),
        "gemini": GeminiAdapter(endpoints["gemini"], http),
    }
