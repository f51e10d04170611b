"""Calls an AI provider's chat endpoint with timeouts, retries, a circuit breaker and a bulkhead."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson

from leaky_tokens.shared.circuit_breaker import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
)
from leaky_tokens.shared.clock import Clock
from leaky_tokens.shared.errors import AppError
from leaky_tokens.shared.outbound import AiohttpOutbound, Outbound, OutboundError
from leaky_tokens.shared.resilience import Bulkhead, BulkheadFull, retry

log = logging.getLogger(__name__)


class ProviderCallFailed(AppError):
    """The provider gave no usable answer; `reason` is short and safe to show to the caller."""

    status = 502
    code = "PROVIDER_ERROR"
    default_message = "provider call failed"

    def __init__(
        self,
        provider: str,
        reason: str,
        *,
        upstream_status: int | None = None,
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(details=[{"provider": provider, "reason": reason}])
        self.provider = provider
        self.reason = reason
        self.upstream_status = upstream_status
        self.retry_after_seconds = retry_after_seconds


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    """Per provider: `timeout_seconds` bounds one try, `attempts` counts tries in total."""

    timeout_seconds: float = 5.0
    attempts: int = 2
    base_delay: float = 0.05
    max_delay: float = 0.5
    max_concurrent: int = 64
    max_wait_seconds: float = 1.0
    breaker: BreakerConfig = field(default_factory=BreakerConfig)


class _ProviderFault(Exception):
    """A try that says the provider is unhealthy: retried, and counted by the breaker."""

    def __init__(self, reason: str, upstream_status: int | None = None) -> None:
        self.reason = reason
        self.upstream_status = upstream_status
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class _Rejected:
    """The provider answered and refused the request (4xx): healthy, so not a breaker failure."""

    status: int


@dataclass(frozen=True, slots=True)
class _Route:
    url: str
    breaker: CircuitBreaker
    bulkhead: Bulkhead


def _is_fault(exc: BaseException) -> bool:
    return isinstance(exc, _ProviderFault)


class ProviderClient:
    """One pooled HTTP client for all providers; a breaker and a bulkhead per provider."""

    def __init__(
        self,
        base_urls: Mapping[str, str],
        settings: ProviderSettings,
        *,
        clock: Clock | None = None,
        outbound: Outbound | None = None,
    ) -> None:
        self._settings = settings
        self._routes = {
            provider: _Route(
                url=f"{base_url.rstrip('/')}/api/v1/{provider}/chat",
                breaker=CircuitBreaker(
                    provider, settings.breaker, clock, on_state_change=_log_state_change
                ),
                bulkhead=Bulkhead(settings.max_concurrent, settings.max_wait_seconds),
            )
            for provider, base_url in base_urls.items()
        }
        # The pool limit is for all providers, and each provider's bulkhead admits
        # max_concurrent calls, so the pool never makes a bulkhead-admitted call queue.
        connections = settings.max_concurrent * max(1, len(self._routes))
        headers = {"accept": "application/json", "user-agent": "leaky-tokens"}
        self._http: Outbound = outbound or AiohttpOutbound(
            max_connections=connections, headers=headers
        )

    async def __aenter__(self) -> ProviderClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def breaker_snapshots(self) -> dict[str, dict[str, Any]]:
        return {provider: route.breaker.snapshot() for provider, route in self._routes.items()}

    async def chat(self, provider: str, payload: dict[str, Any]) -> dict[str, Any]:
        """The provider's JSON answer, or `ProviderCallFailed` saying why there is none."""
        route = self._routes.get(provider)
        if route is None:
            raise ValueError(f"unknown provider {provider!r}")
        # Checked before queueing for a bulkhead slot, so an open breaker fails fast even when
        # the slots are held by calls still waiting out their timeouts.
        if route.breaker.state is BreakerState.OPEN:
            raise ProviderCallFailed(
                provider,
                "circuit breaker open",
                retry_after_seconds=route.breaker.retry_after_seconds,
            )
        try:
            async with route.bulkhead:
                answer = await route.breaker.call(
                    lambda: self._call_with_retries(route, payload), is_failure=_is_fault
                )
        except CircuitOpenError as exc:
            raise ProviderCallFailed(
                provider, "circuit breaker open", retry_after_seconds=exc.retry_after_seconds
            ) from None
        except BulkheadFull:
            raise ProviderCallFailed(provider, "too many concurrent calls") from None
        except _ProviderFault as exc:
            log.warning(
                "provider call failed",
                extra={
                    "provider": provider,
                    "reason": exc.reason,
                    "attempts": self._settings.attempts,
                },
            )
            raise ProviderCallFailed(
                provider, exc.reason, upstream_status=exc.upstream_status
            ) from None
        if isinstance(answer, _Rejected):
            raise ProviderCallFailed(
                provider,
                f"provider rejected the request ({answer.status})",
                upstream_status=answer.status,
            )
        return answer

    async def _call_with_retries(
        self, route: _Route, payload: dict[str, Any]
    ) -> dict[str, Any] | _Rejected:
        return await retry(
            lambda: self._try_once(route, payload),
            attempts=self._settings.attempts,
            base_delay=self._settings.base_delay,
            max_delay=self._settings.max_delay,
            retry_on=_is_fault,
        )

    async def _try_once(self, route: _Route, payload: dict[str, Any]) -> dict[str, Any] | _Rejected:
        timeout = self._settings.timeout_seconds
        try:
            # httpx's timeout applies per network operation; this one bounds the whole try,
            # so a provider that trickles its answer cannot hold the caller longer.
            async with asyncio.timeout(timeout):
                response = await self._http.post_json(route.url, payload)
        except TimeoutError:
            raise _ProviderFault(f"no answer within {timeout:g}s") from None
        # The exception texts may carry the URL; the reasons stay generic on purpose.
        except OutboundError:
            raise _ProviderFault("provider unreachable") from None
        status = response.status
        if 400 <= status < 500:
            return _Rejected(status)
        if not 200 <= status < 300:
            raise _ProviderFault(f"provider answered {status}", upstream_status=status)
        try:
            body = orjson.loads(response.body)
        except orjson.JSONDecodeError:
            raise _ProviderFault("provider answered a body that is not JSON") from None
        if not isinstance(body, dict):
            raise _ProviderFault("provider answered JSON that is not an object")
        return body


def _log_state_change(name: str, old: BreakerState, new: BreakerState) -> None:
    level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
    log.log(
        level,
        "provider circuit breaker changed state",
        extra={"provider": name, "from": old.value, "to": new.value},
    )
