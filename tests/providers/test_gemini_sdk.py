"""The official `google-genai` SDK, unmodified, against the Gemini stub over real sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from google import genai
from google.genai import errors, types

from leaky_tokens.shared.tokenizer import tokenizer_for
from tests.providers.conftest import LiveStub, live_stub

# google-genai's async client subclasses aiohttp's ClientSession, which aiohttp frowns upon.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession:DeprecationWarning"
)

FLASH = "gemini-2.0-flash"  # no thinking
THINKER = "gemini-2.5-flash"


@pytest.fixture
async def gemini(gemini_stub: LiveStub) -> AsyncIterator[genai.Client]:
    client = genai.Client(
        api_key="test-key", http_options=types.HttpOptions(base_url=gemini_stub.url)
    )
    try:
        yield client
    finally:
        await client.aio.aclose()


def prompt_tokens(*messages: dict[str, str]) -> int:
    return tokenizer_for("gemini", FLASH).count_messages(messages)


async def test_generate_content_reports_usage_counted_by_the_tokenizer(
    gemini: genai.Client,
) -> None:
    answer = await gemini.aio.models.generate_content(model=FLASH, contents="Hello")

    usage = answer.usage_metadata
    assert answer.text
    assert answer.candidates[0].finish_reason == types.FinishReason.STOP
    assert usage.prompt_token_count == prompt_tokens({"role": "user", "content": "Hello"}) == 8
    assert usage.candidates_token_count == tokenizer_for("gemini", FLASH).count(answer.text)
    assert usage.thoughts_token_count is None
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count
    assert answer.model_version == FLASH
    assert answer.response_id


async def test_a_system_instruction_is_part_of_the_prompt(gemini: genai.Client) -> None:
    config = types.GenerateContentConfig(system_instruction="Answer in French.")
    answer = await gemini.aio.models.generate_content(model=FLASH, contents="Hello", config=config)
    expected = prompt_tokens(
        {"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}
    )
    assert answer.usage_metadata.prompt_token_count == expected


async def test_thinking_models_bill_thoughts_apart_from_candidates(gemini: genai.Client) -> None:
    answer = await gemini.aio.models.generate_content(model=THINKER, contents="Hello")
    usage = answer.usage_metadata
    assert usage.thoughts_token_count > 0
    assert usage.total_token_count == (
        usage.prompt_token_count + usage.candidates_token_count + usage.thoughts_token_count
    )
    no_budget = types.GenerateContentConfig(thinking_config=types.ThinkingConfig(thinking_budget=0))
    plain = await gemini.aio.models.generate_content(model=THINKER, contents="Hi", config=no_budget)
    assert plain.usage_metadata.thoughts_token_count is None


async def test_thoughts_are_shown_only_when_asked(gemini: genai.Client) -> None:
    config = types.GenerateContentConfig(
        thinking_config=types.ThinkingConfig(include_thoughts=True)
    )
    answer = await gemini.aio.models.generate_content(model=THINKER, contents="Hi", config=config)
    parts = answer.candidates[0].content.parts
    assert parts[0].thought is True
    assert not parts[-1].thought


async def test_same_contents_same_reply_other_contents_other_reply(gemini: genai.Client) -> None:
    first = await gemini.aio.models.generate_content(model=FLASH, contents="Hello")
    again = await gemini.aio.models.generate_content(model=FLASH, contents="Hello")
    other = await gemini.aio.models.generate_content(model=FLASH, contents="Goodbye")
    assert first.text == again.text != other.text
    assert first.usage_metadata == again.usage_metadata


async def test_max_output_tokens_cuts_with_max_tokens(gemini: genai.Client) -> None:
    full = await gemini.aio.models.generate_content(model=FLASH, contents="Hello")
    config = types.GenerateContentConfig(max_output_tokens=5)
    capped = await gemini.aio.models.generate_content(model=FLASH, contents="Hello", config=config)
    assert capped.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert capped.usage_metadata.candidates_token_count == 5
    assert full.text.startswith(capped.text)


async def test_thoughts_count_inside_max_output_tokens(gemini: genai.Client) -> None:
    config = types.GenerateContentConfig(max_output_tokens=3)
    answer = await gemini.aio.models.generate_content(model=THINKER, contents="Hi", config=config)
    usage = answer.usage_metadata
    assert answer.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert usage.thoughts_token_count == 3
    assert usage.candidates_token_count is None  # omitted when zero, as the real API does
    assert usage.total_token_count == usage.prompt_token_count + 3


async def test_a_stream_has_usage_candidates_only_on_its_last_chunk(gemini: genai.Client) -> None:
    plain = await gemini.aio.models.generate_content(model=FLASH, contents="Hello")
    chunks = [
        c
        async for c in await gemini.aio.models.generate_content_stream(
            model=FLASH, contents="Hello"
        )
    ]
    assert len(chunks) >= 3
    assert "".join(c.text or "" for c in chunks) == plain.text
    assert all(c.usage_metadata.candidates_token_count is None for c in chunks[:-1])
    assert all(c.candidates[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP
    assert chunks[-1].usage_metadata == plain.usage_metadata


async def test_the_sse_wire_has_crlf_separators_and_no_done(gemini_stub: LiveStub) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "Hello"}]}]}
    async with httpx.AsyncClient(base_url=gemini_stub.api_url) as raw:
        sse = await raw.post(f"/models/{FLASH}:streamGenerateContent?alt=sse&key=k", json=body)
        array = await raw.post(f"/models/{FLASH}:streamGenerateContent?key=k", json=body)
    assert sse.headers["content-type"].startswith("text/event-stream")
    events = sse.text.split("\r\n\r\n")
    assert events[-1] == ""
    assert all(e.startswith("data: {") for e in events[:-1])
    assert "[DONE]" not in sse.text
    chunks = orjson.loads(array.content)
    first = orjson.loads(events[0].removeprefix("data: "))
    assert first.keys() == chunks[0].keys()
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"


async def test_count_tokens_agrees_with_the_reported_prompt(gemini: genai.Client) -> None:
    counted = await gemini.aio.models.count_tokens(model=FLASH, contents="Hello")
    answer = await gemini.aio.models.generate_content(model=FLASH, contents="Hello")
    assert counted.total_tokens == answer.usage_metadata.prompt_token_count


async def test_models_can_be_listed_and_fetched(gemini: genai.Client) -> None:
    names = [m.name async for m in await gemini.aio.models.list()]
    assert f"models/{THINKER}" in names
    one = await gemini.aio.models.get(model="gemini-9-ultra")
    assert one.name == "models/gemini-9-ultra"


# --- key and request errors ---------------------------------------------------------------


async def test_the_key_comes_as_a_header_or_a_query_parameter(gemini_stub: LiveStub) -> None:
    body = {"contents": [{"parts": [{"text": "Hi"}]}]}
    path = f"/models/{FLASH}:generateContent"
    async with httpx.AsyncClient(base_url=gemini_stub.api_url) as raw:
        missing = await raw.post(path, json=body)
        header = await raw.post(path, json=body, headers={"x-goog-api-key": "k"})
        query = await raw.post(path + "?key=k", json=body)
        invalid = await raw.post(path + "?key=k", json={"contents": []})
    assert missing.status_code == 403
    assert missing.json()["error"]["status"] == "PERMISSION_DENIED"
    assert header.status_code == query.status_code == 200
    assert invalid.status_code == 400
    assert invalid.json()["error"]["status"] == "INVALID_ARGUMENT"


async def test_a_wrong_key_is_api_key_invalid_when_a_key_is_configured() -> None:
    async with live_stub("gemini", api_key="right") as stub:
        client = genai.Client(api_key="wrong", http_options=types.HttpOptions(base_url=stub.url))
        try:
            with pytest.raises(errors.ClientError) as raised:
                await client.aio.models.generate_content(model=FLASH, contents="Hi")
        finally:
            await client.aio.aclose()
    assert raised.value.code == 400
    assert raised.value.details["error"]["details"][0]["reason"] == "API_KEY_INVALID"


# --- faults as the SDK sees them ----------------------------------------------------------


async def test_a_429_is_resource_exhausted_with_retry_info(
    gemini_stub: LiveStub, gemini: genai.Client
) -> None:
    await gemini_stub.set_faults(rateLimited=True, retryAfterMs=3700)
    with pytest.raises(errors.ClientError) as raised:
        await gemini.aio.models.generate_content(model=FLASH, contents="Hi")
    error = raised.value
    assert error.code == 429
    assert error.status == "RESOURCE_EXHAUSTED"
    details = {d["@type"].rsplit(".", 1)[-1]: d for d in error.details["error"]["details"]}
    assert details["RetryInfo"]["retryDelay"] == "3.700s"
    assert details["QuotaFailure"]["violations"][0]["quotaDimensions"]["model"] == FLASH


async def test_the_sdk_retries_a_429_into_an_answer(gemini_stub: LiveStub) -> None:
    await gemini_stub.set_faults(rateLimited=True, retryAfterMs=10, remainingCalls=2)
    retry = types.HttpRetryOptions(attempts=3, initial_delay=0.01, max_delay=0.05, jitter=0)
    client = genai.Client(
        api_key="k", http_options=types.HttpOptions(base_url=gemini_stub.url, retry_options=retry)
    )
    try:
        answer = await client.aio.models.generate_content(model=FLASH, contents="Hi")
    finally:
        await client.aio.aclose()
    assert answer.text
    assert (await gemini_stub.faults())["rateLimited"] is False


@pytest.mark.parametrize(
    ("faults", "code", "status"),
    [({"failureRate": 1.0}, 500, "INTERNAL"), ({"down": True}, 503, "UNAVAILABLE")],
)
async def test_server_faults_are_the_sdks_server_error(
    gemini_stub: LiveStub, gemini: genai.Client, faults: dict[str, Any], code: int, status: str
) -> None:
    await gemini_stub.set_faults(**faults)
    with pytest.raises(errors.ServerError) as raised:
        await gemini.aio.models.generate_content(model=FLASH, contents="Hi")
    assert raised.value.code == code
    assert raised.value.status == status


async def test_error_bodies_can_come_as_an_array(gemini_stub: LiveStub) -> None:
    await gemini_stub.set_faults(rateLimited=True, errorAsArray=True)
    body = {"contents": [{"parts": [{"text": "Hi"}]}]}
    async with httpx.AsyncClient(base_url=gemini_stub.api_url) as raw:
        limited = await raw.post(f"/models/{FLASH}:generateContent?key=k", json=body)
        invalid = await raw.post(f"/models/{FLASH}:generateContent?key=k", json={})
    assert limited.status_code == 429
    assert limited.json()[0]["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert invalid.json()[0]["error"]["status"] == "INVALID_ARGUMENT"


async def test_a_hang_is_a_timeout_for_the_sdk(gemini_stub: LiveStub) -> None:
    await gemini_stub.set_faults(hang=True, remainingCalls=1)
    client = genai.Client(
        api_key="k", http_options=types.HttpOptions(base_url=gemini_stub.url, timeout=300)
    )
    try:
        with pytest.raises(Exception) as raised:  # the SDK surfaces its transport's timeout
            await client.aio.models.generate_content(model=FLASH, contents="Hi")
        assert "imeout" in type(raised.value).__name__ or "imeout" in repr(raised.value)
        assert (await client.aio.models.generate_content(model=FLASH, contents="Hi")).text
    finally:
        await client.aio.aclose()


async def test_a_mid_stream_error_event_is_the_sdks_api_error(
    gemini_stub: LiveStub, gemini: genai.Client
) -> None:
    await gemini_stub.set_faults(errorEventAfter=2)
    received: list[Any] = []
    with pytest.raises(errors.ServerError) as raised:
        await drain(
            await gemini.aio.models.generate_content_stream(model=FLASH, contents="Hi"), received
        )
    assert len(received) == 2
    assert raised.value.code == 500


async def test_a_stream_cut_in_the_middle_raises_in_the_sdk(
    gemini_stub: LiveStub, gemini: genai.Client
) -> None:
    await gemini_stub.set_faults(cutStreamAfter=2)
    received: list[Any] = []
    with pytest.raises(Exception) as raised:  # aiohttp's or httpx's payload error
        await drain(
            await gemini.aio.models.generate_content_stream(model=FLASH, contents="Hi"), received
        )
    assert len(received) == 2
    assert not isinstance(raised.value, errors.APIError)


async def drain(stream: Any, into: list[Any]) -> None:
    async for chunk in stream:
        into.append(chunk)


# --- embeddings ---------------------------------------------------------------------------


async def test_embed_content_is_deterministic_with_usage(gemini: genai.Client) -> None:
    answer = await gemini.aio.models.embed_content(
        model="gemini-embedding-001", contents=["alpha", "beta", "alpha"]
    )
    vectors = [e.values for e in answer.embeddings]
    assert len(vectors) == 3
    assert all(len(v) == 3072 for v in vectors)
    assert vectors[0] == vectors[2] != vectors[1]
    tokenizer = tokenizer_for("gemini", "gemini-embedding-001")
    assert answer.usage_metadata.prompt_token_count == 2 * tokenizer.count("alpha") + 1


async def test_embed_content_honours_output_dimensionality(gemini: genai.Client) -> None:
    config = types.EmbedContentConfig(output_dimensionality=8)
    answer = await gemini.aio.models.embed_content(
        model="gemini-embedding-001", contents="alpha", config=config
    )
    assert len(answer.embeddings[0].values) == 8


async def test_the_single_embed_content_endpoint(gemini_stub: LiveStub) -> None:
    body = {"content": {"parts": [{"text": "alpha"}]}, "outputDimensionality": 4}
    async with httpx.AsyncClient(base_url=gemini_stub.api_url) as raw:
        answer = await raw.post("/models/gemini-embedding-001:embedContent?key=k", json=body)
    assert answer.status_code == 200
    assert len(answer.json()["embedding"]["values"]) == 4
