"""What the /v1 service and the provider adapters exchange: a chat call in OpenAI's terms, the
usage a provider reported, and why a provider call failed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from leaky_tokens.tokens.inference.catalogue import ModelRoute

FailureKind = Literal[
    "rate_limited",  # 429: transient, retry after the hint
    "unavailable",  # 503
    "failed",  # 5xx, an unreadable answer, our credentials refused
    "timeout",  # sent, and no (complete) answer in time: never retried
    "rejected",  # 4xx about the request itself (a bad parameter)
    "cut",  # a stream broke off, or ended without its end
]


class ProviderError(Exception):
    """A provider call that produced no (complete) answer. `message` is safe to show: it never
    carries a URL or a key."""

    def __init__(
        self,
        kind: FailureKind,
        message: str,
        *,
        status: int | None = None,
        retry_after_seconds: float | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind: FailureKind = kind
        self.message = message
        self.status = status
        self.retry_after_seconds = retry_after_seconds
        self.param = param


@dataclass(frozen=True, slots=True)
class ChatCall:
    """One chat completion as the adapters send it, in OpenAI's vocabulary."""

    route: ModelRoute
    messages: list[dict[str, Any]]
    max_tokens: int  # what the reservation covers: never more is asked of the provider
    stream: bool
    # Other OpenAI parameters the client sent (temperature, stop, tools, …), passed on.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens as the provider counts them; thinking tokens are inside `completion_tokens`."""

    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_openai(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }


def usage_from_openai(value: Any) -> Usage | None:
    """An OpenAI-style `usage` object (OpenAI, DashScope compatible mode); None if absent."""
    if not isinstance(value, dict):
        return None
    prompt = value.get("prompt_tokens")
    completion = value.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    details = value.get("completion_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    prompt_details = value.get("prompt_tokens_details")
    cached = prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else None
    return Usage(
        max(0, prompt),
        max(0, completion),
        reasoning if isinstance(reasoning, int) else 0,
        cached if isinstance(cached, int) else 0,
    )
