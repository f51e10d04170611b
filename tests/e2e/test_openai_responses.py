"""Issue 12 against a real `leaky-tokens up`, with the official `openai` SDK unchanged:
embeddings (the SDK's default base64 and float), the Responses API (plain and streamed, native
for OpenAI, translated for Qwen and Gemini) and idempotent inference, each charged exactly.
"""

from __future__ import annotations

import base64
import struct
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
    with pytest.raises(openai.NotFoundError) as stored:
        client.responses.retrieve("resp_123")
    assert stored.value.code == "response_not_found"
    for provider in CHAT:
        assert tenant.remaining(provider) == 100_000


def _unique() -> str:
    return uuid.uuid4().hex
