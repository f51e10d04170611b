"""Request and response models of the provider stubs (camelCase on the wire)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from leaky_tokens.providers.faults import MAX_LATENCY_MS, MAX_RETRY_AFTER_MS, Faults

ProviderName = Literal["qwen", "gemini", "openai"]


class CamelModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class UsageRead(CamelModel):
    prompt_tokens: int = Field(ge=0, description="Tokens of the request's text (offline tokenizer)")
    completion_tokens: int = Field(ge=0, description="Tokens of the reply message")
    total_tokens: int = Field(ge=0)


class ChatRead(CamelModel):
    id: str = Field(examples=["openai-0b7e8f55-2f0c-4d55-9a3e-2b1d4f6c8e90"])
    provider: ProviderName
    received: dict[str, Any] = Field(description="The request body, echoed unchanged")
    created: str = Field(
        description="When the reply was made, ISO-8601 UTC ending in Z",
        examples=["2026-02-05T10:40:00.000Z"],
    )
    message: str = Field(examples=["Stubbed OpenAI response"])
    usage: UsageRead


class FaultsUpdate(CamelModel):
    """The complete fault set (PUT replaces it; an omitted field goes back to its default)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        strict=True,
        extra="forbid",
        allow_inf_nan=False,
    )

    failure_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="Probability that a call answers 500"
    )
    latency_ms: int = Field(
        0, ge=0, le=MAX_LATENCY_MS, description="Milliseconds added before every answer"
    )
    down: bool = Field(False, description="Every call answers 503")
    rate_limited: bool = Field(
        False, description="Every call answers 429 with the provider's body and retry hint"
    )
    retry_after_ms: int = Field(
        1000,
        ge=0,
        le=MAX_RETRY_AFTER_MS,
        description="The retry hint of a 429 (retry-after-ms / Retry-After for OpenAI, "
        "RetryInfo.retryDelay for Gemini; DashScope sends none)",
    )
    hang: bool = Field(False, description="Calls are accepted and never answered")
    chunk_delay_ms: int | None = Field(
        None,
        ge=0,
        le=MAX_LATENCY_MS,
        description="Pause before each streamed chunk (null: the setting)",
    )
    cut_stream_after: int | None = Field(
        None, ge=0, description="Streams: close the connection after N events, no terminator"
    )
    error_event_after: int | None = Field(
        None, ge=0, description="Streams: send the provider's error event after N events"
    )
    error_as_array: bool = Field(
        False, description="Gemini: error bodies wrapped in a JSON array, as Vertex sometimes does"
    )
    remaining_calls: int | None = Field(
        None, ge=1, description="Apply the faults to the next N calls only, then clear them"
    )

    def to_faults(self) -> Faults:
        return Faults(**self.model_dump())


class FaultsRead(FaultsUpdate):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    @classmethod
    def of(cls, faults: Faults) -> FaultsRead:
        return cls(**asdict(faults))


class HealthRead(CamelModel):
    service: str = Field(examples=["openai-stub"])
    status: Literal["UP"] = "UP"
