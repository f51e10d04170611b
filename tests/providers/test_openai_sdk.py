"""The official `openai` SDK, unmodified, against the OpenAI stub (/v1) and the Qwen stub
(DashScope compatible mode, /compatible-mode/v1) over real sockets."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from leaky_tokens.shared.tokenizer import tokenizer_for
from tests.providers.conftest import LiveStub, live_stub

HELLO = [{"role": "user", "content": "Hello"}]
MODELS = {"openai": "gpt-4o-mini", "qwen": "qwen-plus"}


@pytest.fixture(params=["openai", "qwen"])
async def stub(request: pytest.FixtureRequest) -> AsyncIterator[LiveStub]:
    async with live_stub(request.param) as running:
        yield running


def sdk_for(stub: LiveStub) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stub.api_url, api_key="sk-test", max_retries=0)


@pytest.fixture
async def client(stub: LiveStub) -> AsyncIterator[openai.AsyncOpenAI]:
    async with sdk_for(stub) as sdk:
        yield sdk


def model_of(stub: LiveStub) -> str:
    return MODELS[stub.provider]


async def collect(stream: Any) -> list[Any]:
    return [chunk async for chunk in stream]


async def drain(stream: Any, into: list[Any]) -> None:
    async for chunk in stream:
        into.append(chunk)


# --- chat completions ---------------------------------------------------------------------


async def test_plain_chat_reports_usage_counted_by_the_tokenizer(
    stub: LiveStub, client: openai.AsyncOpenAI
) -> None:
    model = model_of(stub)
    answer = await client.chat.completions.create(model=model, messages=HELLO)

    tokenizer = tokenizer_for(stub.provider, model)
    choice = answer.choices[0]
    assert answer.object == "chat.completion"
    assert answer.model == model
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == tokenizer.count_messages(HELLO) == 8
    assert answer.usage.completion_tokens == tokenizer.count(choice.message.content)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer._request_id


async def test_same_messages_same_reply_and_usage_other_prompt_other_reply(
    stub: LiveStub, client: openai.AsyncOpenAI
) -> None:
    model = model_of(stub)
    first = await client.chat.completions.create(model=model, messages=HELLO)
    again = await client.chat.completions.create(model=model, messages=HELLO)
    other = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Goodbye"}]
    )
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.usage == again.usage
    assert first.id != again.id
    assert other.choices[0].message.content != first.choices[0].message.content


@pytest.mark.parametrize("cap", ["max_tokens", "max_completion_tokens"])
async def test_an_output_cap_cuts_the_reply_with_finish_reason_length(
    stub: LiveStub, client: openai.AsyncOpenAI, cap: str
) -> None:
    model = model_of(stub)
    full = await client.chat.completions.create(model=model, messages=HELLO)
    capped = await client.chat.completions.create(model=model, messages=HELLO, **{cap: 5})

    assert capped.choices[0].finish_reason == "length"
    assert capped.usage.completion_tokens == 5
    assert full.choices[0].message.content.startswith(capped.choices[0].message.content)
    # a cap above the natural length changes nothing
    roomy = await client.chat.completions.create(model=model, messages=HELLO, max_tokens=4096)
    assert roomy.choices[0].message.content == full.choices[0].message.content
    assert roomy.choices[0].finish_reason == "stop"


async def test_a_stream_comes_in_several_chunks_with_the_plain_answer(
    stub: LiveStub, client: openai.AsyncOpenAI
) -> None:
    model = model_of(stub)
    plain = await client.chat.completions.create(model=model, messages=HELLO)
    chunks = await collect(
        await client.chat.completions.create(model=model, messages=HELLO, stream=True)
    )

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert len(chunks) >= 4
    assert {c.id for c in chunks} == {chunks[0].id}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    # no usage anywhere unless asked for
    assert all(c.usage is None for c in chunks)


async def test_include_usage_adds_a_last_chunk_with_no_choices(
    stub: LiveStub, client: openai.AsyncOpenAI
) -> None:
    model = model_of(stub)
    plain = await client.chat.completions.create(model=model, messages=HELLO)
    chunks = await collect(
        await client.chat.completions.create(
            model=model,
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])


async def test_a_capped_stream_ends_with_length(stub: LiveStub, client: openai.AsyncOpenAI) -> None:
    chunks = await collect(
        await client.chat.completions.create(
            model=model_of(stub),
            messages=HELLO,
            stream=True,
            max_tokens=6,
            stream_options={"include_usage": True},
        )
    )
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6


async def test_dashscope_stream_quirks_are_on_the_wire(qwen_stub: LiveStub) -> None:
    body = {"model": "qwen-plus", "messages": HELLO, "stream": True}
    async with httpx.AsyncClient(base_url=qwen_stub.api_url) as raw:
        response = await raw.post(
            "/chat/completions", json=body, headers={"Authorization": "Bearer sk-test"}
        )
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    chunks = [httpx.Response(200, content=e.removeprefix("data: ")).json() for e in events[:-1]]
    assert all(chunk["usage"] is None for chunk in chunks)
    finishes = [chunk["choices"][0]["finish_reason"] for chunk in chunks]
    assert finishes[0] is None
    assert set(finishes[1:-1]) == {""}
    assert finishes[-1] == "stop"


async def test_openai_reasoning_models_count_hidden_reasoning_tokens(
    openai_stub: LiveStub,
) -> None:
    async with openai.AsyncOpenAI(base_url=openai_stub.api_url, api_key="k") as sdk:
        answer = await sdk.chat.completions.create(model="o3-mini", messages=HELLO)
    usage = answer.usage
    reasoning = usage.completion_tokens_details.reasoning_tokens
    assert reasoning > 0
    visible = tokenizer_for("openai", "o3-mini").count(answer.choices[0].message.content)
    assert usage.completion_tokens == reasoning + visible


async def test_qwen_thinking_models_stream_reasoning_content_first(qwen_stub: LiveStub) -> None:
    async with openai.AsyncOpenAI(base_url=qwen_stub.api_url, api_key="k") as sdk:
        chunks = await collect(
            await sdk.chat.completions.create(
                model="qwq-plus",
                messages=HELLO,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    kinds = [
        "reasoning" if (c.choices[0].delta.model_extra or {}).get("reasoning_content") else "text"
        for c in chunks[1:-2]
    ]
    assert kinds[0] == "reasoning"
    assert kinds == sorted(kinds)  # all reasoning before any text
    assert "text" in kinds
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens > 0


async def test_a_bad_body_is_the_sdks_bad_request_naming_the_param(
    client: openai.AsyncOpenAI, stub: LiveStub
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await client.chat.completions.create(model=model_of(stub), messages=[])
    assert raised.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as raised:
        await client.chat.completions.create(model=model_of(stub), messages=HELLO, max_tokens=0)
    assert raised.value.param == "max_tokens"


async def test_a_missing_or_wrong_key_is_an_authentication_error() -> None:
    async with live_stub("openai", api_key="sk-right") as stub:
        async with httpx.AsyncClient(base_url=stub.api_url) as raw:
            missing = await raw.post("/chat/completions", json={"model": "m", "messages": HELLO})
        async with openai.AsyncOpenAI(base_url=stub.api_url, api_key="sk-wrong") as sdk:
            with pytest.raises(openai.AuthenticationError) as raised:
                await sdk.chat.completions.create(model="m", messages=HELLO)
            async with openai.AsyncOpenAI(base_url=stub.api_url, api_key="sk-right") as right:
                assert (await right.chat.completions.create(model="m", messages=HELLO)).choices
    assert missing.status_code == 401
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
    assert raised.value.code == "invalid_api_key"


async def test_an_unknown_path_is_a_404_in_the_providers_shape(stub: LiveStub) -> None:
    async with httpx.AsyncClient(base_url=stub.api_url) as raw:
        response = await raw.post("/completions/nothing", json={})
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


# --- models -------------------------------------------------------------------------------


async def test_models_list_and_any_model_can_be_retrieved(
    stub: LiveStub, client: openai.AsyncOpenAI
) -> None:
    page = await client.models.list()
    ids = [m.id for m in page.data]
    assert model_of(stub) in ids
    assert all(m.object == "model" for m in page.data)
    one = await client.models.retrieve("some-future-model")
    assert one.id == "some-future-model"


# --- faults as the SDK sees them ----------------------------------------------------------


async def test_a_429_carries_the_openai_retry_hint_which_the_sdk_honours(
    openai_stub: LiveStub,
) -> None:
    await openai_stub.set_faults(rateLimited=True, retryAfterMs=50, remainingCalls=2)
    async with openai.AsyncOpenAI(base_url=openai_stub.api_url, api_key="k", max_retries=2) as sdk:
        started = time.perf_counter()
        answer = await sdk.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        elapsed = time.perf_counter() - started
    assert answer.choices[0].finish_reason == "stop"
    # two waits of 50 ms (retry-after-ms), not the SDK's 0.5 s back-off
    assert 0.1 <= elapsed < 0.9
    assert (await openai_stub.faults())["rateLimited"] is False  # the two calls used them up


async def test_a_429_without_retries_is_a_rate_limit_error_with_the_hint(
    openai_stub: LiveStub,
) -> None:
    await openai_stub.set_faults(rateLimited=True, retryAfterMs=1500)
    async with openai.AsyncOpenAI(base_url=openai_stub.api_url, api_key="k", max_retries=0) as sdk:
        with pytest.raises(openai.RateLimitError) as raised:
            await sdk.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    error = raised.value
    assert error.code == "rate_limit_exceeded"
    assert error.type == "requests"
    assert error.response.headers["retry-after-ms"] == "1500"
    assert error.response.headers["retry-after"] == "2"
    assert "1.5s" in error.message


async def test_a_dashscope_429_is_throttling_rate_quota_without_a_header(
    qwen_stub: LiveStub,
) -> None:
    await qwen_stub.set_faults(rateLimited=True)
    async with openai.AsyncOpenAI(base_url=qwen_stub.api_url, api_key="k", max_retries=0) as sdk:
        with pytest.raises(openai.RateLimitError) as raised:
            await sdk.chat.completions.create(model="qwen-plus", messages=HELLO)
    assert raised.value.code == "Throttling.RateQuota"
    assert "retry-after" not in raised.value.response.headers
    assert raised.value.response.json()["request_id"]


@pytest.mark.parametrize(("faults", "status"), [({"failureRate": 1.0}, 500), ({"down": True}, 503)])
async def test_server_faults_are_the_sdks_internal_server_error(
    stub: LiveStub, client: openai.AsyncOpenAI, faults: dict[str, Any], status: int
) -> None:
    await stub.set_faults(**faults)
    with pytest.raises(openai.InternalServerError) as raised:
        await client.chat.completions.create(model=model_of(stub), messages=HELLO)
    assert raised.value.status_code == status


async def test_a_hang_is_a_timeout_for_the_client_and_the_stub_recovers(
    stub: LiveStub, client: openai.AsyncOpenAI
) -> None:
    await stub.set_faults(hang=True, remainingCalls=1)
    with pytest.raises(openai.APITimeoutError):
        await client.with_options(timeout=0.3).chat.completions.create(
            model=model_of(stub),
            messages=HELLO,
        )
    answer = await client.chat.completions.create(model=model_of(stub), messages=HELLO)
    assert answer.choices[0].finish_reason == "stop"


async def test_a_stream_cut_in_the_middle_raises_in_the_sdk(
    stub: LiveStub, client: openai.AsyncOpenAI
) -> None:
    await stub.set_faults(cutStreamAfter=3)
    stream = await client.chat.completions.create(model=model_of(stub), messages=HELLO, stream=True)
    received: list[Any] = []
    with pytest.raises(openai.APIConnectionError):
        await drain(stream, received)
    assert len(received) == 3


async def test_a_mid_stream_error_event_is_the_sdks_api_error(
    stub: LiveStub, client: openai.AsyncOpenAI
) -> None:
    await stub.set_faults(errorEventAfter=2)
    stream = await client.chat.completions.create(model=model_of(stub), messages=HELLO, stream=True)
    received: list[Any] = []
    with pytest.raises(openai.APIError) as raised:
        await drain(stream, received)
    assert len(received) == 2
    assert raised.value.code in ("server_error", "InternalError", None)
    assert raised.value.message


async def test_chunk_delay_and_latency_slow_the_answer(
    stub: LiveStub, client: openai.AsyncOpenAI
) -> None:
    await stub.set_faults(chunkDelayMs=20, latencyMs=50)
    started = time.perf_counter()
    stream = await client.chat.completions.create(model=model_of(stub), messages=HELLO, stream=True)
    first = time.perf_counter()
    chunks = await collect(stream)
    done = time.perf_counter()
    assert first - started >= 0.05
    assert done - started >= 0.05 + 0.02 * (len(chunks) - 1)


async def test_the_chunk_delay_setting_paces_every_stream() -> None:
    async with live_stub("openai", chunk_delay_ms=15, tokens_per_chunk=2) as stub:
        async with openai.AsyncOpenAI(base_url=stub.api_url, api_key="k") as sdk:
            started = time.perf_counter()
            chunks = await collect(
                await sdk.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=HELLO,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            elapsed = time.perf_counter() - started
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) >= chunks[-1].usage.completion_tokens // 2
    assert elapsed >= 0.015 * (len(chunks) - 1)


# --- embeddings ---------------------------------------------------------------------------


async def test_embeddings_default_base64_decode_to_the_float_vectors(
    stub: LiveStub, client: openai.AsyncOpenAI
) -> None:
    model = "text-embedding-3-small" if stub.provider == "openai" else "text-embedding-v3"
    packed = await client.embeddings.create(model=model, input="Hello")  # SDK asks for base64
    floats = await client.embeddings.create(model=model, input="Hello", encoding_format="float")

    vector = packed.data[0].embedding
    assert len(vector) == (1536 if stub.provider == "openai" else 1024)
    assert sum(v * v for v in vector) == pytest.approx(1.0, rel=1e-4)
    assert vector == pytest.approx(floats.data[0].embedding, abs=1e-6)
    assert packed.usage.prompt_tokens == tokenizer_for(stub.provider, model).count("Hello")


async def test_embeddings_of_a_list_with_dimensions_are_deterministic(
    stub: LiveStub, client: openai.AsyncOpenAI
) -> None:
    model = "text-embedding-3-small" if stub.provider == "openai" else "text-embedding-v3"
    texts = ["alpha", "beta gamma", "alpha"]
    answer = await client.embeddings.create(model=model, input=texts, dimensions=64)

    vectors = [d.embedding for d in answer.data]
    assert [d.index for d in answer.data] == [0, 1, 2]
    assert all(len(v) == 64 for v in vectors)
    assert vectors[0] == vectors[2] != vectors[1]
    tokenizer = tokenizer_for(stub.provider, model)
    assert answer.usage.prompt_tokens == sum(tokenizer.count(t) for t in texts)


async def test_openai_embeds_token_arrays(openai_stub: LiveStub) -> None:
    async with openai.AsyncOpenAI(base_url=openai_stub.api_url, api_key="k") as sdk:
        answer = await sdk.embeddings.create(model="text-embedding-3-small", input=[[1, 2, 3], [4]])
    assert len(answer.data) == 2
    assert answer.usage.prompt_tokens == 4


async def test_dashscope_takes_at_most_ten_inputs(qwen_stub: LiveStub) -> None:
    async with openai.AsyncOpenAI(base_url=qwen_stub.api_url, api_key="k", max_retries=0) as sdk:
        with pytest.raises(openai.BadRequestError):
            await sdk.embeddings.create(model="text-embedding-v3", input=["x"] * 11)


# --- responses (OpenAI) -------------------------------------------------------------------


@pytest.fixture
async def openai_client(openai_stub: LiveStub) -> AsyncIterator[openai.AsyncOpenAI]:
    async with sdk_for(openai_stub) as sdk:
        yield sdk


async def test_responses_plain_with_instructions_and_usage(
    openai_client: openai.AsyncOpenAI,
) -> None:
    response = await openai_client.responses.create(
        model="gpt-4o-mini", input="Hello", instructions="Be brief."
    )
    tokenizer = tokenizer_for("openai", "gpt-4o-mini")
    messages = [{"role": "system", "content": "Be brief."}, *HELLO]
    assert response.status == "completed"
    assert response.output_text
    assert response.usage.input_tokens == tokenizer.count_messages(messages)
    assert response.usage.output_tokens == tokenizer.count(response.output_text)
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


async def test_responses_message_input_matches_the_chat_reply(
    openai_client: openai.AsyncOpenAI,
) -> None:
    chat = await openai_client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    response = await openai_client.responses.create(
        model="gpt-4o-mini", input=[{"role": "user", "content": "Hello"}]
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens


async def test_responses_stream_events_through_completed(
    openai_client: openai.AsyncOpenAI,
) -> None:
    plain = await openai_client.responses.create(model="gpt-4o-mini", input="Hello")
    events = await collect(
        await openai_client.responses.create(model="gpt-4o-mini", input="Hello", stream=True)
    )
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == plain.output_text
    assert events[0].response.usage is None
    assert events[-1].response.usage == plain.usage


async def test_a_stored_response_can_be_retrieved_and_an_unknown_one_is_a_404(
    openai_client: openai.AsyncOpenAI,
) -> None:
    created = await openai_client.responses.create(model="gpt-4o-mini", input="Hello")
    unstored = await openai_client.responses.create(model="gpt-4o-mini", input="Hi", store=False)

    found = await openai_client.responses.retrieve(created.id)
    assert found.output_text == created.output_text
    for missing in (unstored.id, "resp_nothing"):
        with pytest.raises(openai.NotFoundError):
            await openai_client.responses.retrieve(missing)


async def test_max_output_tokens_leaves_the_response_incomplete(
    openai_client: openai.AsyncOpenAI,
) -> None:
    response = await openai_client.responses.create(
        model="gpt-4o-mini", input="Hello", max_output_tokens=16
    )
    natural = await openai_client.responses.create(model="gpt-4o-mini", input="Hello")
    if natural.usage.output_tokens <= 16:
        pytest.fail("the natural reply should be longer than 16 tokens for this prompt")
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 16


async def test_a_responses_stream_error_event_reaches_the_sdk(
    openai_stub: LiveStub, openai_client: openai.AsyncOpenAI
) -> None:
    await openai_stub.set_faults(errorEventAfter=3)
    events = await collect(
        await openai_client.responses.create(model="gpt-4o-mini", input="Hello", stream=True)
    )
    assert [e.type for e in events][-1] == "error"
    assert events[-1].sequence_number == 3
