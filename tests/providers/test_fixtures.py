"""The recorded real-format bodies parse, and the stubs answer in the same shapes."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from tests.providers.conftest import LiveStub
from tests.providers.fixtures import ROOT, load_json, load_sse, raw_bytes

HELLO = [{"role": "user", "content": "Hello"}]
BEARER = {"Authorization": "Bearer sk-test"}


def missing_paths(expected: Any, actual: Any, path: str = "$") -> list[str]:
    """Where `actual` lacks a key that `expected` has (lists compared by their first item)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [path]
        gaps: list[str] = []
        for key, value in expected.items():
            if key not in actual:
                gaps.append(f"{path}.{key}")
            elif value is not None and actual[key] is not None:
                gaps.extend(missing_paths(value, actual[key], f"{path}.{key}"))
        return gaps
    if isinstance(expected, list) and expected and isinstance(actual, list) and actual:
        return missing_paths(expected[0], actual[0], f"{path}[0]")
    return []


def sse_payloads(body: bytes) -> list[Any]:
    payloads = []
    for event in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data: "):
                data = line.removeprefix(b"data: ")
                payloads.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return payloads


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.*")))
def test_every_fixture_parses(path: str) -> None:
    if path.endswith(".json"):
        assert load_json(path)
    elif path.endswith(".sse"):
        events = load_sse(path)
        assert events
        if path.startswith("gemini/"):
            assert b"\r\n\r\n" in raw_bytes(path)
            assert "[DONE]" not in events


async def test_openai_chat_answers_in_the_recorded_shapes(openai_stub: LiveStub) -> None:
    async with httpx.AsyncClient(base_url=openai_stub.api_url, headers=BEARER) as raw:
        plain = await raw.post(
            "/chat/completions", json={"model": "gpt-4o-mini", "messages": HELLO}
        )
        stream = await raw.post(
            "/chat/completions",
            json={
                "model": "gpt-4o-mini",
                "messages": HELLO,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        models = await raw.get("/models")
        embeddings = await raw.post(
            "/embeddings", json={"model": "text-embedding-3-small", "input": "Hi"}
        )
        response = await raw.post("/responses", json={"model": "gpt-4o-mini", "input": "Hi"})
        streamed = await raw.post(
            "/responses", json={"model": "gpt-4o-mini", "input": "Hi", "stream": True}
        )
    assert missing_paths(load_json("openai/chat_completion.json"), plain.json()) == []
    recorded, got = load_sse("openai/chat_stream_include_usage.sse"), sse_payloads(stream.content)
    assert missing_paths(recorded[1], got[1]) == []
    assert missing_paths(recorded[-2], got[-2]) == []  # the usage chunk
    assert got[-1] == "[DONE]"
    assert missing_paths(load_json("openai/models.json"), models.json()) == []
    assert missing_paths(load_json("openai/embeddings.json"), embeddings.json()) == []
    assert missing_paths(load_json("openai/response.json"), response.json()) == []
    recorded_events = load_sse("openai/responses_stream.sse")
    got_events = sse_payloads(streamed.content)
    delta = "response.output_text.delta"
    assert [e["type"] for e in got_events if e["type"] != delta] == [
        e["type"] for e in recorded_events if e["type"] != delta
    ]
    for want, have in zip(recorded_events[:4], got_events, strict=False):
        assert missing_paths(want, have) == []


@pytest.mark.parametrize(
    ("faults", "fixture"),
    [
        ({"failureRate": 1.0}, "openai/error_server.json"),
        ({"rateLimited": True}, "openai/error_rate_limit_tokens.json"),
    ],
)
async def test_openai_errors_answer_in_the_recorded_shape(
    openai_stub: LiveStub, faults: dict[str, Any], fixture: str
) -> None:
    await openai_stub.set_faults(**faults)
    async with httpx.AsyncClient(base_url=openai_stub.api_url, headers=BEARER) as raw:
        answer = await raw.post("/chat/completions", json={"model": "m", "messages": HELLO})
    assert missing_paths(load_json(fixture), answer.json()) == []


async def test_dashscope_answers_in_the_recorded_shapes(qwen_stub: LiveStub) -> None:
    body = {
        "model": "qwq-plus",
        "messages": HELLO,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with httpx.AsyncClient(base_url=qwen_stub.api_url, headers=BEARER) as raw:
        stream = await raw.post("/chat/completions", json=body)
        await qwen_stub.set_faults(rateLimited=True)
        limited = await raw.post("/chat/completions", json=body)
    recorded = load_sse("dashscope/chat_stream_reasoning_content.sse")
    got = sse_payloads(stream.content)
    for index in (0, 1, -3, -2):
        assert missing_paths(recorded[index], got[index]) == [], index
    assert got[-1] == "[DONE]"
    assert limited.status_code == 429
    assert (
        missing_paths(load_json("dashscope/error_throttling_rate_quota.json"), limited.json()) == []
    )


async def test_gemini_answers_in_the_recorded_shapes(gemini_stub: LiveStub) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "Hello"}]}]}
    async with httpx.AsyncClient(base_url=gemini_stub.api_url, params={"key": "k"}) as raw:
        plain = await raw.post("/models/gemini-2.5-pro:generateContent", json=body)
        stream = await raw.post(
            "/models/gemini-2.5-flash:streamGenerateContent", json=body, params={"alt": "sse"}
        )
        await gemini_stub.set_faults(rateLimited=True, remainingCalls=1)
        limited = await raw.post("/models/gemini-2.5-flash:generateContent", json=body)
        await gemini_stub.set_faults(down=True, remainingCalls=1)
        down = await raw.post("/models/gemini-2.5-flash:generateContent", json=body)
        await gemini_stub.set_faults(errorAsArray=True, remainingCalls=1)
        invalid = await raw.post("/models/gemini-2.5-flash:generateContent", json={})
    recorded = load_sse("gemini/stream.sse")
    got = sse_payloads(stream.content)
    ignore = {"$.usageMetadata.cachedContentTokenCount"}
    gaps = missing_paths(load_json("gemini/generate_content_thinking.json"), plain.json())
    assert set(gaps) <= ignore
    assert missing_paths(recorded[0], got[0]) == []
    assert missing_paths(recorded[-1], got[-1]) == []
    assert set(got[0]["usageMetadata"]) == set(recorded[0]["usageMetadata"])
    assert missing_paths(load_json("gemini/error_resource_exhausted.json"), limited.json()) == []
    assert missing_paths(load_json("gemini/error_unavailable.json"), down.json()) == []
    recorded_array = load_json("gemini/error_array_invalid_argument.json")
    assert isinstance(invalid.json(), list)
    assert set(invalid.json()[0]["error"]) >= set(recorded_array[0]["error"]) - {"details"}
