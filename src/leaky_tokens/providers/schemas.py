"""Request and response models of the provider stubs (camelCase on the wire)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from leaky_tokens.providers.faults import MAX_LATENCY_MS, Faults

ProviderName = Literal["qwen", "gemini", "openai"]


class CamelModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class UsageRead(CamelModel):
    prompt_tokens: int = Field(ge=0, description="ceil(characters / 4) of the request's text")
    completion_tokens: int = Field(ge=0, description="ceil(characters / 4) of the reply message")
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
        0.0, ge=0.0, le=1.0, description="Probability that a chat call answers 500"
    )
    latency_ms: int = Field(
        0, ge=0, le=MAX_LATENCY_MS, description="Milliseconds added before every chat answer"
    )
    down: bool = Field(False, description="Every chat call answers 503")

    def to_faults(self) -> Faults:
        return Faults(failure_rate=self.failure_rate, latency_ms=self.latency_ms, down=self.down)


class FaultsRead(CamelModel):
    failure_rate: float
    latency_ms: int
    down: bool

    @classmethod
    def of(cls, faults: Faults) -> FaultsRead:
        return cls(failure_rate=faults.failure_rate, latency_ms=faults.latency_ms, down=faults.down)


class HealthRead(CamelModel):
    service: str = Field(examples=["openai-stub"])
    status: Literal["UP"] = "UP"
