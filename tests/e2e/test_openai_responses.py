"""Issue 12 against a real `leaky-tokens up`, with the official `openai` SDK unchanged:
embeddings (the SDK's default base64 and float), the Responses API (plain and streamed, native
for OpenAI, translated for Qwen and Gemini) and idempotent inference, each charged exactly.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import agents  # the OpenAI Agents SDK (openai-agents, a dev dependency)
import httpx
import openai
import pytest

from tests.e2e.conftest import Stack
from tests.e2e.journeys import Account, admin_env, login
from tests.e2e.test_openai_inference import Tenant

pytestmark = pytest.mark.e2e

ADMIN_USERNAME = "e2e_responses_admin"
EMBEDDERS = {
    "openai": "text-embedding-3-small",
    "qwen": "text-embedding-v3",
    "gemini": "gemini-embedding-001",
}
CHAT = {"openai": "gpt-4o-mini", "qwen": "qwen-turbo", "gemini": "gemini-2.5-flash"}
TEXTS = ["The gateway meters every token.", "令牌网关按令牌计费。"]


@pytest.fixture(scope="module")
def system(stack_env: tuple[Path, dict[str, str], str]) -> Iterator[Stack]:
    workdir, env, shape = stack_env
    running = Stack(workdir, env, shape)
    running.up(
        extra_env={
            **admin_env(ADMIN_USERNAME),
            "LEAKY_GATEWAY__RATE_LIMIT_REQUESTS": "100000",
            "LEAKY_GATEWAY__USER_LIMIT_REQUESTS": "100000",
            "LEAKY_GATEWAY__ADDRESS_LIMIT_REQUESTS": "100000",
            "LEAKY_TOKENS__BUCKET_CAPACITY": "1000000",
            "LEAKY_TOKENS__BUCKET_LEAK_PER_SECOND": "1000000",
            "LEAKY_STUBS__CHUNK_DELAY_MS": "20",
            # A hung provider call (the in-flight test) ends in a 504 within seconds.
            "LEAKY_INFERENCE__TIMEOUT_SECONDS": "8",
        }
    )
    try:
        yield running
    finally:
        running.stop_all()


@pytest.fixture(scope="module")
def gateway(system: Stack) -> Iterator[httpx.Client]:
    with system.client("gateway") as client:
        yield client


@pytest.fixture(scope="module")
def admin(gateway: httpx.Client) -> Account:
    return login(gateway, Account("", ADMIN_USERNAME, "admin-password-123", ""))


@pytest.fixture
def tenant(gateway: httpx.Client, admin: Account) -> Tenant:
    return Tenant(gateway, admin)


SdkFactory = Callable[..., openai.OpenAI]


@pytest.fixture
def sdk(system: Stack) -> Iterator[SdkFactory]:
    """`sdk(tenant, **options)`: an SDK client on the gateway, closed after the test (an SDK
    client left to the garbage collector leaks its sockets: a ResourceWarning, an error)."""
    opened: list[openai.OpenAI] = []

    def make(tenant: Tenant, **options: Any) -> openai.OpenAI:
        client = tenant.client(system, **options)
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()


# --- embeddings --------------------------------------------------------------------------------


def test_the_catalogue_lists_an_embedding_model_of_each_provider(
    sdk: SdkFactory, tenant: Tenant
) -> None:
    models = {m.id: m.owned_by for m in sdk(tenant).models.list()}
    for provider, model in EMBEDDERS.items():
        assert models[model] == provider


@pytest.mark.parametrize("provider", list(EMBEDDERS))
def test_embeddings_in_the_sdks_default_base64_and_in_float_are_charged_the_reported_usage(
    sdk: SdkFactory, tenant: Tenant, provider: str
) -> None:
    client = sdk(tenant)
    model = EMBEDDERS[provider]
    before = tenant.remaining(provider)
    default = client.embeddings.create(model=model, input=TEXTS)  # the SDK asks for base64
    assert default.usage.prompt_tokens > 0
    assert before - tenant.remaining(provider) == default.usage.prompt_tokens
    assert default.model == model
    assert [d.index for d in default.data] == [0, 1]

    middle = tenant.remaining(provider)
    floats = client.embeddings.create(model=model, input=TEXTS, encoding_format="float")
    assert middle - tenant.remaining(provider) == floats.usage.prompt_tokens
    assert floats.usage.prompt_tokens == default.usage.prompt_tokens  # the stubs are exact
    for decoded, listed in zip(default.data, floats.data, strict=True):
        assert len(decoded.embedding) == len(listed.embedding) > 0
        assert all(isinstance(v, float) for v in decoded.embedding)
        # float32 on the wire for base64: equal to float32 precision.
        assert (
            max(abs(a - b) for a, b in zip(decoded.embedding, listed.embedding, strict=True)) < 1e-6
        )
    assert floats.data[0].embedding != floats.data[1].embedding


@pytest.mark.parametrize("provider", list(EMBEDDERS))
def test_base64_on_the_wire_is_little_endian_float32_and_dimensions_are_honoured(
    gateway: httpx.Client, tenant: Tenant, provider: str
) -> None:
    headers = {"Authorization": f"Bearer {tenant.key['rawKey']}"}
    body = {"model": EMBEDDERS[provider], "input": TEXTS[0], "dimensions": 64}
    as_b64 = gateway.post(
        "/v1/embeddings", headers=headers, json={**body, "encoding_format": "base64"}
    )
    assert as_b64.status_code == 200, as_b64.text
    encoded = as_b64.json()["data"][0]["embedding"]
    assert isinstance(encoded, str)
    raw = base64.b64decode(encoded)
    assert len(raw) == 64 * 4
    as_float = gateway.post("/v1/embeddings", headers=headers, json=body)  # float by default
    assert as_float.status_code == 200, as_float.text
    listed = as_float.json()["data"][0]["embedding"]
    assert len(listed) == 64
    unpacked = struct.unpack("<64f", raw)
    assert max(abs(a - b) for a, b in zip(unpacked, listed, strict=True)) < 1e-6


def test_embedding_errors_are_the_sdks_exceptions_and_charge_nothing(
    sdk: SdkFactory, tenant: Tenant
) -> None:
    client = sdk(tenant, max_retries=0)
    with pytest.raises(openai.BadRequestError) as chat_model:
        client.embeddings.create(model="gpt-4o-mini", input="hello")
    assert chat_model.value.param == "model"
    with pytest.raises(openai.BadRequestError) as embedder_chat:
        client.chat.completions.create(
            model="text-embedding-3-small", messages=[{"role": "user", "content": "hi"}]
        )
    assert embedder_chat.value.param == "model"
    with pytest.raises(openai.BadRequestError) as empty:
        client.embeddings.create(model="text-embedding-3-small", input=[])
    assert empty.value.param == "input"
    with pytest.raises(openai.BadRequestError) as tokens_to_gemini:
        client.embeddings.create(model="gemini-embedding-001", input=[[1, 2, 3]])
    assert tokens_to_gemini.value.param == "input"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-embedder", input="hello")
    for provider in EMBEDDERS:
        assert tenant.remaining(provider) == 100_000


def test_token_array_input_is_charged_its_length(sdk: SdkFactory, tenant: Tenant) -> None:
    client = sdk(tenant)
    answer = client.embeddings.create(
        model="text-embedding-3-small", input=[[10, 20, 30], [40, 50]]
    )
    assert answer.usage.prompt_tokens == 5
    assert tenant.remaining("openai") == 100_000 - 5


def test_an_exhausted_pool_refuses_embeddings_without_retries(
    sdk: SdkFactory, gateway: httpx.Client, admin: Account
) -> None:
    poor = Tenant(gateway, admin, tokens=3)
    with pytest.raises(openai.RateLimitError) as exhausted:
        sdk(poor, max_retries=2).embeddings.create(
            model="text-embedding-v3", input=" ".join(["many words"] * 20)
        )
    assert exhausted.value.code == "insufficient_quota"
    assert poor.remaining("qwen") == 3


# --- the Responses API ------------------------------------------------------------------------


@pytest.mark.parametrize("provider", list(CHAT))
def test_a_plain_response_is_charged_exactly_its_reported_usage(
    sdk: SdkFactory, tenant: Tenant, provider: str
) -> None:
    client = sdk(tenant)
    before = tenant.remaining(provider)
    raw = client.responses.with_raw_response.create(
        model=CHAT[provider],
        instructions="Answer in one short sentence.",
        input="Say hello to the gateway.",
        max_output_tokens=40,
    )
    response = raw.parse()
    assert response.object == "response"
    assert response.model == CHAT[provider]
    assert response.status in ("completed", "incomplete")
    assert response.output_text
    assert response.usage is not None
    assert response.usage.input_tokens > 0
    assert response.usage.output_tokens > 0
    assert before - tenant.remaining(provider) == response.usage.total_tokens
    assert raw.headers["x-request-id"]


@pytest.mark.parametrize("provider", list(CHAT))
def test_a_streamed_response_sends_the_typed_events_and_is_charged_exactly(
    sdk: SdkFactory, tenant: Tenant, provider: str
) -> None:
    client = sdk(tenant)
    before = tenant.remaining(provider)
    events = list(
        client.responses.create(
            model=CHAT[provider],
            input=[
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]},
            ],
            max_output_tokens=40,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    for expected in (
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ):
        assert expected in kinds, kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas
    assert final.output_text == deltas
    assert final.model == CHAT[provider]
    assert final.usage is not None
    assert before - tenant.remaining(provider) == final.usage.total_tokens


@pytest.mark.parametrize("provider", ["openai", "qwen"])
def test_a_responses_stream_its_client_leaves_is_charged_its_input_and_what_was_streamed(
    gateway: httpx.Client, admin: Account, sdk: SdkFactory, tenant: Tenant, provider: str
) -> None:
    client = sdk(tenant)
    full = None
    for take in range(30):  # a natural answer of many chunks (the stubs are deterministic)
        prompt = f"Tell me a story about gateways, take {take}."
        answer = client.responses.create(model=CHAT[provider], input=prompt)
        assert answer.usage is not None
        if answer.usage.output_tokens >= 32:
            full = answer.usage
            break
    assert full is not None
    slow = Faults(gateway, admin, provider)
    slow.set(chunkDelayMs=250)  # the client surely leaves before the answer is over
    try:
        before = tenant.remaining(provider)
        stream = client.responses.create(model=CHAT[provider], input=prompt, stream=True)
        deltas = 0
        for event in stream:
            deltas += event.type == "response.output_text.delta"
            if deltas == 2:
                break
        stream.close()  # the client leaves mid-answer

        def charged() -> int:
            return before - tenant.remaining(provider)

        # While the stream is open its reservation (input + the model's output limit) is
        # held; once the client is gone the call settles to the input plus what was streamed.
        poll_until(lambda: charged() < full.total_tokens, "the abandoned stream is settled")
        assert full.input_tokens < charged() < full.total_tokens
    finally:
        slow.clear()


def test_a_stored_openai_response_is_retrieved_by_its_creator_only(
    gateway: httpx.Client, admin: Account, sdk: SdkFactory, tenant: Tenant
) -> None:
    client = sdk(tenant)
    plain = client.responses.create(model="gpt-4o-mini", input="Remember me.")
    streamed = list(client.responses.create(model="gpt-4o-mini", input="Me too.", stream=True))
    streamed_id = streamed[-1].response.id
    for created in (plain.id, streamed_id):
        found = client.responses.retrieve(created)
        assert found.id == created
        assert found.model == "gpt-4o-mini"
    assert client.responses.retrieve(plain.id).output_text == plain.output_text
    before = tenant.remaining("openai")
    client.responses.retrieve(plain.id)
    assert tenant.remaining("openai") == before  # reading is free

    stranger = sdk(Tenant(gateway, admin), max_retries=0)
    with pytest.raises(openai.NotFoundError) as foreign:
        stranger.responses.retrieve(plain.id)
    assert foreign.value.code == "response_not_found"
    unstored = client.responses.create(model="gpt-4o-mini", input="Forget me.", store=False)
    translated = client.responses.create(model="qwen-turbo", input="Hello.")
    for missing in (unstored.id, translated.id):
        with pytest.raises(openai.NotFoundError):
            sdk(tenant, max_retries=0).responses.retrieve(missing)


def test_responses_errors_are_the_sdks_exceptions_and_charge_nothing(
    sdk: SdkFactory, tenant: Tenant
) -> None:
    client = sdk(tenant, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="hello")
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model="gpt-4o-mini", input=[])
    assert bad.value.param == "input"
    with pytest.raises(openai.BadRequestError) as embedder:
        client.responses.create(model="text-embedding-v3", input="hello")
    assert embedder.value.param == "model"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.retrieve("resp_123")
    assert unknown.value.code == "response_not_found"
    for provider in CHAT:
        assert tenant.remaining(provider) == 100_000


def test_embeddings_and_responses_reach_the_per_model_report(
    gateway: httpx.Client, sdk: SdkFactory, tenant: Tenant
) -> None:
    client = sdk(tenant)
    embedded = client.embeddings.create(model="gemini-embedding-001", input=TEXTS)
    response = client.responses.create(model="gemini-2.5-flash", input="Hello!")
    assert response.usage is not None
    wanted = {"gemini-embedding-001", "gemini-2.5-flash"}
    rows: dict[str, Any] = {}

    def reported() -> bool:
        answer = gateway.get(
            "/api/v1/analytics/report",
            params={"provider": "gemini", "byModel": "true", "windowMinutes": 60},
            headers=tenant.account.bearer,
        )
        assert answer.status_code == 200, answer.text
        rows.clear()
        rows.update({m["model"]: m for m in answer.json()["byModel"]})
        return wanted <= rows.keys()

    poll_until(reported, "both calls are in the report")
    embedder = rows["gemini-embedding-001"]
    assert embedder["promptTokens"] == embedded.usage.prompt_tokens
    assert embedder["completionTokens"] == 0
    assert embedder["allowedTokens"] == embedded.usage.prompt_tokens
    chat = rows["gemini-2.5-flash"]
    assert chat["promptTokens"] == response.usage.input_tokens
    assert chat["completionTokens"] == response.usage.output_tokens
    assert chat["p50LatencyMs"] is not None


# --- idempotent inference --------------------------------------------------------------------


def _key() -> dict[str, str]:
    return {"Idempotency-Key": f"test-{uuid.uuid4()}"}


class Faults:
    """The OpenAI stub's faults, set by an ADMIN through the gateway. `remainingCalls` counts
    the provider calls that reached the stub while they are set."""

    def __init__(self, gateway: httpx.Client, admin: Account, provider: str = "openai") -> None:
        self.gateway, self.admin = gateway, admin
        self.path = f"/api/v1/{provider}/faults"

    def set(self, **faults: object) -> None:
        answer = self.gateway.put(self.path, headers=self.admin.bearer, json=faults)
        assert answer.status_code == 200, answer.text

    def remaining_calls(self) -> int:
        """Calls the faults still apply to; 0 once used up (the stub then clears them)."""
        answer = self.gateway.get(self.path, headers=self.admin.bearer)
        assert answer.status_code == 200, answer.text
        value: int | None = answer.json()["remainingCalls"]
        return value or 0

    def clear(self) -> None:
        self.gateway.delete(self.path, headers=self.admin.bearer)


@pytest.fixture
def faults(gateway: httpx.Client, admin: Account) -> Iterator[Faults]:
    stub = Faults(gateway, admin)
    try:
        yield stub
    finally:
        stub.clear()


def test_a_replayed_completion_is_the_same_answer_and_charged_once(
    sdk: SdkFactory, tenant: Tenant
) -> None:
    client = sdk(tenant)
    key = _key()
    before = tenant.remaining("qwen")
    first = client.chat.completions.with_raw_response.create(
        model="qwen-turbo", messages=[{"role": "user", "content": "Hi!"}], extra_headers=key
    )
    again = client.chat.completions.with_raw_response.create(
        model="qwen-turbo", messages=[{"role": "user", "content": "Hi!"}], extra_headers=key
    )
    one, two = first.parse(), again.parse()
    assert two.id == one.id
    assert two.choices[0].message.content == one.choices[0].message.content
    assert one.usage is not None
    assert before - tenant.remaining("qwen") == one.usage.total_tokens
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["x-request-id"] != first.headers["x-request-id"]


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_a_replayed_stream_is_the_same_events_and_charged_once(
    sdk: SdkFactory, tenant: Tenant, provider: str
) -> None:
    client = sdk(tenant)
    key = _key()
    before = tenant.remaining(provider)

    def run() -> list[Any]:
        stream = client.responses.create(
            model=CHAT[provider], input="Count to three.", stream=True, extra_headers=key
        )
        return list(stream)

    first = run()
    again = run()
    # The same events: same ids, text and usage.
    assert [e.model_dump() for e in again] == [e.model_dump() for e in first]
    assert first[-1].type == "response.completed"
    usage = first[-1].response.usage
    assert usage is not None
    assert before - tenant.remaining(provider) == usage.total_tokens


def test_the_same_key_with_another_body_is_a_422_the_sdk_does_not_retry(
    system: Stack, tenant: Tenant
) -> None:
    attempts: list[httpx.Request] = []
    with httpx.Client(event_hooks={"request": [attempts.append]}) as counting:
        client = tenant.client(system, max_retries=2, http_client=counting)
        key = _key()
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "one"}], extra_headers=key
        )
        charged = 100_000 - tenant.remaining("openai")
        attempts.clear()
        with pytest.raises(openai.UnprocessableEntityError) as reused:
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "two"}],
                extra_headers=key,
            )
    assert reused.value.code == "idempotency_key_reused"
    assert len(attempts) == 1
    assert 100_000 - tenant.remaining("openai") == charged


def test_a_duplicate_while_the_first_is_in_flight_is_a_409_with_retry_after(
    gateway: httpx.Client, sdk: SdkFactory, tenant: Tenant, faults: Faults
) -> None:
    faults.set(hang=True, remainingCalls=1)  # the first call reaching the stub hangs
    key = _key()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Wait for it."}]}
    headers = {"Authorization": f"Bearer {tenant.key['rawKey']}", **key}
    outcome: dict[str, int] = {}

    def first_call() -> None:
        with httpx.Client(base_url=gateway.base_url, timeout=60) as client:
            outcome["status"] = client.post(
                "/v1/chat/completions", json=body, headers=headers
            ).status_code

    worker = threading.Thread(target=first_call)
    worker.start()
    try:
        poll_until(lambda: faults.remaining_calls() == 0, "the first call reaches the stub")
        busy = gateway.post("/v1/chat/completions", json=body, headers=headers)
        assert busy.status_code == 409, busy.text
        assert busy.json()["error"]["code"] == "idempotency_request_in_progress"
        assert busy.headers["retry-after"] == "1"
        assert int(busy.headers["retry-after-ms"]) > 0
    finally:
        worker.join(60)
    assert outcome["status"] == 504  # the hung call timed out: refunded, and its key released
    assert tenant.remaining("openai") == 100_000
    retried = sdk(tenant).chat.completions.create(**body, extra_headers=key)  # type: ignore[call-overload]
    assert retried.usage is not None
    assert 100_000 - tenant.remaining("openai") == retried.usage.total_tokens


def test_concurrent_calls_with_one_key_make_one_provider_call_and_one_charge(
    sdk: SdkFactory, tenant: Tenant, faults: Faults
) -> None:
    faults.set(latencyMs=1000, remainingCalls=1000)  # slow enough for the others to collide
    key = _key()
    # The SDK retries the 409s (retry-after-ms) into the replay; generous retries for a
    # loaded machine.
    client = sdk(tenant, max_retries=200)
    messages = [{"role": "user", "content": "All at once."}]
    with ThreadPoolExecutor(20) as pool:
        answers = list(
            pool.map(
                lambda _: client.chat.completions.create(
                    model="gpt-4o-mini", messages=messages, extra_headers=key
                ),
                range(20),
            )
        )
    assert len({a.id for a in answers}) == 1
    assert len({a.choices[0].message.content for a in answers}) == 1
    assert 1000 - faults.remaining_calls() == 1
    usage = answers[0].usage
    assert usage is not None
    assert 100_000 - tenant.remaining("openai") == usage.total_tokens


def poll_until(condition: Callable[[], bool], what: str, deadline: float = 30.0) -> None:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


# --- the OpenAI Agents SDK ----------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "qwen"])
def test_a_one_tool_agent_of_the_agents_sdk_runs_through_the_gateway_charged_exactly(
    system: Stack, tenant: Tenant, provider: str
) -> None:
    agents.set_tracing_disabled(True)  # no trace export to the real OpenAI

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"It is sunny in {city}."

    async def run() -> Any:
        client = openai.AsyncOpenAI(
            base_url=system.url("gateway") + "/v1", api_key=tenant.key["rawKey"]
        )
        try:
            agent = agents.Agent(
                name="weather",
                instructions="Answer weather questions; use the tool.",
                tools=[get_weather],
                model=agents.OpenAIResponsesModel(model=CHAT[provider], openai_client=client),
            )
            return await agents.Runner.run(agent, "What is the weather in Paris?")
        finally:
            await client.close()

    before = tenant.remaining(provider)
    result = asyncio.run(run())
    assert isinstance(result.final_output, str)
    assert result.final_output
    usage = result.context_wrapper.usage
    assert usage.requests >= 1
    assert usage.input_tokens > 0
    assert before - tenant.remaining(provider) == usage.total_tokens
