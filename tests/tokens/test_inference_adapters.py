"""The /v1 provider adapters against recorded real-format bodies, replayed byte for byte by a
loopback server (real HTTP framing): translation both ways, usage (thinking billed, the last
report counts), provider quirks, errors, and the retry rule that never bills twice."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from fastapi import FastAPI, Request
from starlette.responses import Response

from leaky_tokens.settings import InferenceSettings
from leaky_tokens.shared.circuit_breaker import BreakerConfig
from leaky_tokens.tokens.inference import gemini
from leaky_tokens.tokens.inference.adapters import (
    Endpoint,
    GeminiAdapter,
    OpenAiCompatibleAdapter,
    ProviderHttp,
)
from leaky_tokens.tokens.inference.catalogue import ModelRoute
from leaky_tokens.tokens.inference.wire import ChatCall, ProviderError
from tests.live_server import closed_port, serving
from tests.providers.fixtures import load_json, raw_bytes


@dataclass
class Replay:
    """Answers each request with the next (status, body bytes, headers); records requests."""

    answers: list[tuple[int, bytes, dict[str, str]]]
    seen: list[tuple[str, dict[str, Any], dict[str, str]]] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/{path:path}")
        async def answer(path: str, request: Request) -> Response:
            self.seen.append((path, orjson.loads(await request.body()), dict(request.headers)))
            status, body, headers = (
                self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            )
            media = "text/event-stream" if body.startswith(b"data:") else "application/json"
            return Response(body, status_code=status, media_type=media, headers=headers)

        return app


@asynccontextmanager
async def replaying(
    *answers: tuple[int, bytes, dict[str, str]],
) -> AsyncIterator[tuple[str, Replay]]:
    replay = Replay(list(answers))
    async with serving(replay.app()) as url:
        yield url, replay


def route(provider: str, upstream: str) -> ModelRoute:
    return ModelRoute(f"{upstream}-id", provider, upstream, 128_000, 8_192)


def call(provider: str, upstream: str, *, stream: bool = False) -> ChatCall:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    return ChatCall(route(provider, upstream), messages, 64, stream, {"temperature": 0.2})


def adapter_for(
    provider: str, url: str, breaker: BreakerConfig | None = None, **settings: Any
) -> tuple[OpenAiCompatibleAdapter | GeminiAdapter, ProviderHttp]:
    http = ProviderHttp(InferenceSettings(**settings), breaker)
    endpoint = Endpoint(provider, url, "secret-key")
    if provider == "gemini":
        return GeminiAdapter(endpoint, http), http
    return OpenAiCompatibleAdapter(endpoint, http, dashscope=provider == "qwen"), http


async def drain(
    adapter: OpenAiCompatibleAdapter | GeminiAdapter, chat: ChatCall
) -> tuple[list[dict[str, Any]], Any]:
    stream = await adapter.open_stream(chat)
    try:
        chunks = [chunk async for chunk in stream.chunks()]
    finally:
        await stream.aclose()
    return chunks, stream.usage


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
    )


OK: Callable[[str], tuple[int, bytes, dict[str, str]]] = lambda name: (200, raw_bytes(name), {})  # noqa: E731


async def test_a_qwen_stream_whose_finish_reason_is_empty_reads_as_openai() -> None:
    async with replaying(OK("dashscope/chat_stream_empty_finish_reason.sse")) as (url, replay):
        adapter, http = adapter_for("qwen", url)
        chunks, usage = await drain(adapter, call("qwen", "qwen-plus", stream=True))
        await http.aclose()
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes == [None, None, None, "stop"]  # "" became null
    assert text_of(chunks) == "我是通义千问"
    assert (usage.prompt_tokens, usage.completion_tokens) == (22, 6)
    assert all(c["model"] == "qwen-plus-id" for c in chunks)
    path, sent, headers = replay.seen[0]
    assert path == "chat/completions"
    assert sent["model"] == "qwen-plus"
    assert sent["max_tokens"] == 64
    assert "max_completion_tokens" not in sent
    assert sent["stream_options"] == {"include_usage": True}  # asked upstream, always
    assert sent["temperature"] == 0.2
    assert headers["authorization"] == "Bearer secret-key"


async def test_a_dashscope_usage_chunk_with_an_empty_delta_still_counts() -> None:
    name = "dashscope/chat_stream_usage_chunk_with_empty_delta.sse"
    async with replaying(OK(name)) as (url, _):
        adapter, http = adapter_for("qwen", url)
        _, usage = await drain(adapter, call("qwen", "qwen-plus", stream=True))
        await http.aclose()
    last = [p for p in _payloads(name) if isinstance(p, dict) and p.get("usage")][-1]["usage"]
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        last["prompt_tokens"],
        last["completion_tokens"],
    )


async def test_an_openai_stream_error_event_is_a_cut() -> None:
    async with replaying(OK("openai/chat_stream_error_event.sse")) as (url, _):
        adapter, http = adapter_for("openai", url)
        stream = await adapter.open_stream(call("openai", "gpt-4o-mini", stream=True))
        seen: list[dict[str, Any]] = []

        async def read_all() -> None:
            async for chunk in stream.chunks():
                seen.append(chunk)

        with pytest.raises(ProviderError) as cut:
            await read_all()
        await stream.aclose()
        await http.aclose()
    assert cut.value.kind == "cut"
    assert "budget exhausted mid-stream" in cut.value.message
    assert text_of(seen) == "Hel"


async def test_an_openai_stream_without_done_is_a_cut() -> None:
    body = raw_bytes("openai/chat_stream_include_usage.sse").replace(b"data: [DONE]\n\n", b"")
    async with replaying((200, body, {})) as (url, _):
        adapter, http = adapter_for("openai", url)
        with pytest.raises(ProviderError) as cut:
            await drain(adapter, call("openai", "gpt-4o-mini", stream=True))
        await http.aclose()
    assert cut.value.kind == "cut"


async def test_openai_chat_asks_max_completion_tokens_and_keeps_the_reported_usage() -> None:
    async with replaying(OK("openai/chat_completion.json")) as (url, replay):
        adapter, http = adapter_for("openai", url)
        completion = await adapter.complete(call("openai", "gpt-4o-mini"))
        await http.aclose()
    recorded = load_json("openai/chat_completion.json")
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == recorded["usage"]["prompt_tokens"]
    assert completion.usage.completion_tokens == recorded["usage"]["completion_tokens"]
    assert completion.body["model"] == "gpt-4o-mini-id"
    sent = replay.seen[0][1]
    assert sent["max_completion_tokens"] == 64
    assert "stream" not in sent


async def test_gemini_requests_and_answers_translate_both_ways_with_thinking_billed() -> None:
    async with replaying(OK("gemini/generate_content_thinking.json")) as (url, replay):
        adapter, http = adapter_for("gemini", url)
        completion = await adapter.complete(call("gemini", "gemini-2.5-pro"))
        await http.aclose()
    path, sent, headers = replay.seen[0]
    assert path == "models/gemini-2.5-pro:generateContent"
    assert headers["x-goog-api-key"] == "secret-key"
    assert "authorization" not in headers
    assert sent["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert sent["contents"] == [{"role": "user", "parts": [{"text": "Hi"}]}]
    assert sent["generationConfig"] == {"maxOutputTokens": 64, "temperature": 0.2}
    assert completion.usage is not None
    # thoughtsTokenCount is outside candidatesTokenCount, and billed
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (8, 12 + 1171)
    assert completion.usage.reasoning_tokens == 1171
    choice = completion.body["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("Hello", "stop")
    assert completion.body["usage"]["total_tokens"] == 8 + 12 + 1171


async def test_a_gemini_stream_becomes_openai_chunks_and_the_last_usage_counts() -> None:
    async with replaying(OK("gemini/stream.sse")) as (url, replay):
        adapter, http = adapter_for("gemini", url)
        chunks, usage = await drain(adapter, call("gemini", "gemini-2.5-flash", stream=True))
        await http.aclose()
    assert replay.seen[0][0] == "models/gemini-2.5-flash:streamGenerateContent"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert text_of(chunks) == "The quick brown fox jumps."
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    last = [p["usageMetadata"] for p in _payloads("gemini/stream.sse")][-1]
    assert usage.prompt_tokens == last["promptTokenCount"]
    assert usage.completion_tokens == last["candidatesTokenCount"] + last.get(
        "thoughtsTokenCount", 0
    )
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["total_tokens"] == usage.total_tokens


async def test_a_gemini_stream_ending_before_its_finish_reason_is_a_cut() -> None:
    body = raw_bytes("gemini/stream.sse").split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    async with replaying((200, body, {})) as (url, _):
        adapter, http = adapter_for("gemini", url)
        with pytest.raises(ProviderError) as cut:
            await drain(adapter, call("gemini", "gemini-2.5-flash", stream=True))
        await http.aclose()
    assert cut.value.kind == "cut"


def test_gemini_errors_as_an_array_and_resource_exhausted_with_retry_info() -> None:
    rejected = gemini.error_of(400, load_json("gemini/error_array_invalid_argument.json"))
    assert rejected.kind == "rejected"
    assert "web_search_options" in rejected.message
    exhausted = gemini.error_of(429, load_json("gemini/error_resource_exhausted.json"))
    assert (exhausted.kind, exhausted.status, exhausted.retry_after_seconds) == (
        "rate_limited",
        429,
        19.0,
    )
    assert gemini.error_of(503, load_json("gemini/error_unavailable.json")).kind == "unavailable"
    assert (
        gemini.retry_delay_seconds([{"@type": "x/google.rpc.RetryInfo", "retryDelay": "3.700s"}])
        == 3.7
    )


async def test_a_dashscope_throttle_worded_as_insufficient_quota_stays_a_transient_429() -> None:
    body = raw_bytes("dashscope/error_allocation_quota_looks_like_insufficient_quota.json")
    async with replaying((429, body, {})) as (url, replay):
        adapter, http = adapter_for("qwen", url)
        with pytest.raises(ProviderError) as throttled:
            await adapter.complete(call("qwen", "qwen-plus"))
        await http.aclose()
    assert throttled.value.kind == "rate_limited"  # never the caller's insufficient_quota
    assert len(replay.seen) == 1  # no retry hint: not tried again


async def test_a_429_with_a_short_retry_hint_is_tried_again() -> None:
    limited = (429, raw_bytes("openai/error_rate_limit_tokens.json"), {"retry-after-ms": "50"})
    async with replaying(limited, OK("openai/chat_completion.json")) as (url, replay):
        adapter, http = adapter_for("openai", url, attempts=2)
        completion = await adapter.complete(call("openai", "gpt-4o-mini"))
        await http.aclose()
    assert completion.usage is not None
    assert len(replay.seen) == 2


async def test_a_server_error_is_not_tried_again() -> None:
    async with replaying((500, raw_bytes("openai/error_server.json"), {})) as (url, replay):
        adapter, http = adapter_for("openai", url, attempts=3)
        with pytest.raises(ProviderError) as failed:
            await adapter.complete(call("openai", "gpt-4o-mini"))
        await http.aclose()
    assert failed.value.kind == "failed"
    assert len(replay.seen) == 1


async def test_a_call_that_was_sent_and_timed_out_is_never_repeated() -> None:
    app = FastAPI()
    calls: list[int] = []

    @app.post("/chat/completions")
    async def hang() -> Response:
        import asyncio

        calls.append(1)
        await asyncio.sleep(5)
        return Response(b"{}")

    async with serving(app) as url:
        adapter, http = adapter_for("openai", url, attempts=3, timeout_seconds=0.3)
        with pytest.raises(ProviderError) as slow:
            await adapter.complete(call("openai", "gpt-4o-mini"))
        await http.aclose()
    assert slow.value.kind == "timeout"
    assert calls == [1]


async def test_a_refused_connection_is_tried_again_then_fails() -> None:
    adapter, http = adapter_for("openai", f"http://127.0.0.1:{closed_port()}", attempts=2)
    with pytest.raises(ProviderError) as unreachable:
        await adapter.complete(call("openai", "gpt-4o-mini"))
    await http.aclose()
    assert unreachable.value.kind == "failed"
    assert "127.0.0.1" not in unreachable.value.message


async def test_a_provider_that_keeps_failing_opens_its_breaker_and_is_left_alone() -> None:
    breaker = BreakerConfig(window_size=3, minimum_calls=3, open_seconds=30)
    async with replaying((500, raw_bytes("openai/error_server.json"), {})) as (url, replay):
        adapter, http = adapter_for("openai", url, breaker, attempts=1)
        for _ in range(3):
            with pytest.raises(ProviderError):
                await adapter.complete(call("openai", "gpt-4o-mini"))
        with pytest.raises(ProviderError) as refused:
            await adapter.complete(call("openai", "gpt-4o-mini"))
        await http.aclose()
    assert refused.value.kind == "unavailable"
    assert refused.value.retry_after_seconds is not None
    assert len(replay.seen) == 3  # the fourth never reached the provider
    assert http.breaker_snapshots()["openai"]["state"] == "open"


def _payloads(name: str) -> list[Any]:
    from tests.providers.fixtures import load_sse

    return load_sse(name)


def test_gemini_refuses_what_its_translation_would_drop() -> None:
    chat = ChatCall(
        route("gemini", "gemini-2.5-flash"),
        [{"role": "user", "content": "weather?"}],
        64,
        False,
        {"tools": [{"type": "function", "function": {"name": "weather"}}]},
    )
    with pytest.raises(ProviderError) as refused:
        gemini.to_request(chat)
    assert (refused.value.kind, refused.value.param) == ("rejected", "tools")
