"""The /v1 chat completions of the token service, metered on the quota ledger.

Per call: parse -> catalogue -> count the prompt offline -> reserve prompt + output allowance
(`reserve(at_least = prompt + a minimum answer, at_most = prompt + the allowance)`) -> the leaky
bucket admits min(reservation, capacity) -> the provider is asked for at most the output the
reservation covers -> settle to the usage it reports (or, for a stream that broke off or lost
its client, the prompt plus the tokens already streamed, counted offline and marked estimated)
and refund the rest; the bucket is corrected to what was used. The pool never goes below zero
and never pays more than it reserved. Every outcome writes one usage event in the transaction
that settles it; whoever deletes the reservation row settles (request, stream finaliser,
sweeper), so nothing is refunded or charged twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import orjson
from redis.exceptions import RedisError

from leaky_tokens.settings import InferenceSettings
from leaky_tokens.shared.errors import AppError, Forbidden, ServiceUnavailable
from leaky_tokens.shared.http import go_duration
from leaky_tokens.shared.principal import Principal
from leaky_tokens.shared.tokenizer import Tokenizer, message_text, tokenizer_for
from leaky_tokens.tokens.inference.adapters import Adapter, ChatStream, ProviderHttp
from leaky_tokens.tokens.inference.catalogue import Catalogue, ModelRoute
from leaky_tokens.tokens.inference.errors import (
    BucketFull,
    ContextLengthExceeded,
    InvalidInferenceRequest,
    ProviderFailed,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
    QuotaExhausted,
)
from leaky_tokens.tokens.inference.wire import ChatCall, ProviderError, Usage
from leaky_tokens.tokens.leaky_bucket import BucketConfig, BucketDecision
from leaky_tokens.tokens.outbox import usage_event
from leaky_tokens.tokens.repository import QuotaLedger, SettledReservation
from leaky_tokens.tokens.service import ORG_POOL, USER_POOL, TokenService
from leaky_tokens.tokens.session_budget import SESSION_POOL, SESSION_POOL_PROVIDER

log = logging.getLogger("leaky_tokens.tokens.inference")


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A parsed /v1/chat/completions body."""

    route: ModelRoute
    messages: list[dict[str, Any]]
    requested_output: int | None  # max_tokens / max_completion_tokens (the larger), if sent
    stream: bool
    include_usage: bool
    options: dict[str, Any]


def _invalid(message: str, param: str | None) -> InvalidInferenceRequest:
    details = [{"field": param, "message": message}] if param else None
    return InvalidInferenceRequest(message, details=details)


def parse_chat_request(body: Any, catalogue: Catalogue) -> ChatRequest:
    """The body checked as OpenAI checks it (the error names the parameter at fault)."""
    if not isinstance(body, dict):
        raise _invalid("The request body must be a JSON object.", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("you must provide a model parameter", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty array of messages.", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _invalid(
                f"Invalid 'messages[{i}]': expected an object with a 'role'.", "messages"
            )
        if message["role"] not in ("system", "developer", "user", "assistant", "tool"):
            raise _invalid(f"Invalid value for 'messages[{i}].role'.", "messages")
    outputs: list[int] = []
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _invalid(
                f"Invalid '{name}': integer below minimum value. Expected a value >= 1.", name
            )
        outputs.append(value)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("Invalid 'stream': expected a boolean.", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _invalid("Invalid 'stream_options': expected an object.", "stream_options")
    include_usage = bool(options and options.get("include_usage") is True)
    n = body.get("n", 1)
    if n != 1:
        raise _invalid("Only n = 1 is supported.", "n")
    route = catalogue.resolve_for(model, "chat")  # 404 model_not_found, 400 an embedder
    passed = {k: v for k, v in body.items() if k not in ("model", "messages")}
    # The largest cap counts when both are sent (a smaller one must not shrink the reservation
    # below what the provider would honour).
    return ChatRequest(
        route,
        messages,
        max(outputs) if outputs else None,
        stream,
        include_usage,
        passed,
    )


@dataclass(slots=True)
class Admission:
    """A call that holds a reservation (and bucket room) until it is settled."""

    reservation_id: uuid.UUID
    route: ModelRoute
    tokenizer: Tokenizer
    prompt_estimate: int
    reserved: int
    max_tokens: int
    bucket_key: str
    bucket_config: BucketConfig
    bucket_admitted: int
    decision: BucketDecision
    event_fields: dict[str, Any]
    stream: bool
    started: float = field(default_factory=time.monotonic)
    settled: bool = False

    def rate_limit_headers(self, used: int | None = None) -> dict[str, str]:
        """OpenAI's token rate-limit headers, from the caller's leaky bucket."""
        decision = self.decision
        remaining = decision.remaining
        if used is not None:
            remaining = min(
                decision.capacity,
                remaining + self.bucket_admitted - min(used, self.bucket_admitted),
            )
        return {
            "x-ratelimit-limit-tokens": str(decision.capacity),
            "x-ratelimit-remaining-tokens": str(remaining),
            "x-ratelimit-reset-tokens": go_duration(decision.reset_seconds),
        }


def provider_http_error(error: ProviderError) -> AppError:
    """The answer a client gets for a provider call that failed before any output."""
    headers: dict[str, str] = {}
    if error.retry_after_seconds is not None:
        seconds = max(1, int(error.retry_after_seconds + 0.999))
        headers = {
            "Retry-After": str(seconds),
            "retry-after-ms": str(max(1, round(error.retry_after_seconds * 1000))),
        }
    if error.kind == "rate_limited":
        return ProviderRateLimited(headers=headers or {"Retry-After": "1"})
    if error.kind == "unavailable":
        return ProviderUnavailable(headers=headers)
    if error.kind == "timeout":
        return ProviderTimeout()
    if error.kind == "rejected":
        param = error.param
        details = [{"field": param, "message": error.message}] if param else None
        return InvalidInferenceRequest(error.message, details=details)
    return ProviderFailed(error.message)


class InferenceService:
    """Chat completions on top of the token service's ledger, buckets and outbox."""

    def __init__(
        self,
        tokens: TokenService,
        settings: InferenceSettings,
        catalogue: Catalogue,
        adapters: dict[str, Adapter],
        http: ProviderHttp | None = None,
    ) -> None:
        self.tokens = tokens
        self.settings = settings
        self.catalogue = catalogue
        self.adapters = adapters
        self.http = http

    def breaker_snapshots(self) -> dict[str, dict[str, Any]]:
        return self.http.breaker_snapshots() if self.http is not None else {}

    # --- admission ----------------------------------------------------------------------

    def _pool_of(self, principal: Principal) -> tuple[str, uuid.UUID, uuid.UUID | None]:
        """(kind, owner, org id) of the pool a call charges: the org's for an org's API key;
        an agent session's own pool for its credential (issue 13)."""
        if principal.session_id is not None:
            return SESSION_POOL, principal.session_id, None
        org_id = principal.key_org_id
        if org_id is not None:
            if not principal.may_act_for_org(org_id):
                raise Forbidden("this API key's organisation no longer includes you")
            return ORG_POOL, org_id, org_id
        return USER_POOL, principal.user_id, None

    async def admit(
        self, principal: Principal, request: ChatRequest, request_id: str | None
    ) -> Admission:
        route = request.route
        self._pool_of(principal)  # a foreign org's key is refused before anything is counted
        tokenizer = tokenizer_for(route.provider, route.upstream_model)
        counted = tokenizer.count_messages(request.messages)
        # Tool and schema definitions are prompt tokens at the provider too: counted as their
        # JSON text (a little more than providers count), so the reservation covers them.
        for name in ("tools", "functions", "response_format"):
            if request.options.get(name) is not None:
                counted += tokenizer.count(orjson.dumps(request.options[name]).decode())
        prompt = tokenizer.upper_bound(counted)
        room = route.context_window - prompt
        if room < 1:
            message = (
                f"This model's maximum context length is {route.context_window} tokens; your "
                f"messages take about {prompt}."
            )
            raise ContextLengthExceeded(
                message, details=[{"field": "messages", "message": message}]
            )
        allowance = min(
            request.requested_output or route.max_output_tokens, route.max_output_tokens, room
        )
        minimum = min(self.settings.min_answer_tokens, allowance)
        return await self.admit_counted(
            principal,
            route,
            tokenizer,
            prompt=prompt,
            allowance=allowance,
            minimum=minimum,
            stream=request.stream,
            request_id=request_id,
        )

    async def admit_counted(
        self,
        principal: Principal,
        route: ModelRoute,
        tokenizer: Tokenizer,
        *,
        prompt: int,
        allowance: int,
        minimum: int,
        stream: bool,
        request_id: str | None,
    ) -> Admission:
        """Reserve `prompt + allowance` (at least `prompt + minimum`) and take bucket room for
        it; QuotaExhausted / BucketFull with nothing charged otherwise. `admit` counts a chat;
        embeddings and the Responses API count their own input (issue 12)."""
        kind, owner, org_id = self._pool_of(principal)
        service = self.tokens
        now = service.clock.now()
        reservation_id = uuid.uuid4()
        event_fields: dict[str, Any] = {
            "user_id": principal.user_id,
            "org_id": org_id,
            "provider": route.provider,
            "tokens": prompt + allowance,
            "request_id": request_id,
        }
        v1_fields = {"model": route.id, "stream": stream}
        async with service.db.connection() as conn:
            ledger = QuotaLedger(conn)
            reserved = await ledger.reserve(
                kind,
                owner,
                SESSION_POOL_PROVIDER if kind == SESSION_POOL else route.provider,
                at_least=prompt + minimum,
                at_most=prompt + allowance,
                now=now,
                window=service.window,
            )
            if reserved is None:
                await ledger.add_event(
                    usage_event(
                        "QUOTA_INSUFFICIENT",
                        now=now,
                        **event_fields,
                        extra={**v1_fields, "reservedTokens": 0},
                    )
                )
            else:
                await ledger.add_reservation(
                    reserved.reservation(
                        reservation_id,
                        user_id=principal.user_id,
                        org_id=org_id,
                        provider=route.provider,
                        request_id=request_id,
                        now=now,
                        expires_at=now + timedelta(seconds=self.settings.reservation_ttl_seconds),
                    )
                )
        if reserved is None:
            raise QuotaExhausted()
        config = service.bucket_config(principal, principal.user_id)
        admitted = min(reserved.reserved, config.capacity)
        bucket_key = f"{principal.user_id}:{route.provider}"
        admission = Admission(
            reservation_id=reservation_id,
            route=route,
            tokenizer=tokenizer,
            prompt_estimate=prompt,
            reserved=reserved.reserved,
            max_tokens=reserved.reserved - prompt,
            bucket_key=bucket_key,
            bucket_config=config,
            bucket_admitted=admitted,
            decision=BucketDecision(True, config.capacity, 0, config.capacity, 0.0, 0.0),
            event_fields={**event_fields, "tokens": reserved.reserved},
            stream=stream,
        )
        try:
            try:
                decision = await service.buckets.acquire(bucket_key, admitted, config)
            except RedisError as exc:
                raise ServiceUnavailable("rate limiter unavailable") from exc
        except BaseException:
            admission.bucket_admitted = 0
            await asyncio.shield(self._refund(admission, "ABANDONED", {}))
            raise
        admission.decision = decision
        if not decision.allowed:
            admission.bucket_admitted = 0
            await self._refund(admission, "RATE_LIMITED", {"waitSeconds": decision.wait_seconds})
            retry = max(1, int(decision.wait_seconds + 0.999))
            raise BucketFull(
                headers={
                    "Retry-After": str(retry),
                    "retry-after-ms": str(max(1, round(decision.wait_seconds * 1000))),
                    **admission.rate_limit_headers(),
                }
            )
        return admission

    # --- settlement ---------------------------------------------------------------------

    def _v1_fields(
        self, admission: Admission, prompt: int, completion: int, estimated: bool, outcome: str
    ) -> dict[str, Any]:
        return {
            "model": admission.route.id,
            "promptTokens": prompt,
            "completionTokens": completion,
            "estimated": estimated,
            "latencyMs": round((time.monotonic() - admission.started) * 1000),
            "stream": admission.stream,
            "reservedTokens": admission.reserved,
            "outcome": outcome,
        }

    async def _correct_bucket(self, admission: Admission, used: int) -> None:
        give_back = admission.bucket_admitted - min(used, admission.bucket_admitted)
        if give_back > 0:
            with contextlib.suppress(RedisError):
                await self.tokens.buckets.release(
                    admission.bucket_key, give_back, admission.bucket_config
                )

    async def _refund(self, admission: Admission, decision: str, extra: dict[str, Any]) -> None:
        """Nothing was produced: everything reserved goes back (bucket included)."""
        if admission.settled:
            return
        admission.settled = True
        await self._correct_bucket(admission, 0)
        now = self.tokens.clock.now()
        async with self.tokens.db.connection() as conn:
            ledger = QuotaLedger(conn)
            settled = await ledger.settle(admission.reservation_id, 0, now)
            if settled is None:
                return  # the sweeper got there first
            fields = self._v1_fields(admission, 0, 0, False, decision.lower())
            await ledger.add_event(
                usage_event(
                    decision,
                    now=now,
                    **admission.event_fields,
                    extra={**fields, **extra, "refundedTokens": settled.refunded},
                )
            )

    async def settle(
        self,
        admission: Admission,
        usage: Usage,
        *,
        estimated: bool,
        outcome: str,
        response_id: str | None = None,
    ) -> int:
        """Charge `usage` (never more than reserved) and refund the rest; returns the charge."""
        if admission.settled:
            return 0
        used = usage.prompt_tokens + usage.completion_tokens
        if used > admission.reserved:
            log.warning(
                "provider reported more than was reserved; charging the reservation",
                extra={"model": admission.route.id, "used": used, "reserved": admission.reserved},
            )
        charged = min(used, admission.reserved)
        if charged == 0:
            await self._refund(admission, "PROVIDER_FAILURE", {"outcome": outcome})
            return 0
        admission.settled = True
        await self._correct_bucket(admission, charged)
        now = self.tokens.clock.now()
        async with self.tokens.db.connection() as conn:
            ledger = QuotaLedger(conn)
            settled = await ledger.settle(admission.reservation_id, charged, now)
            if settled is None:
                log.warning("reservation %s was swept before it settled", admission.reservation_id)
                return 0
            extra = {
                **self._v1_fields(
                    admission, usage.prompt_tokens, usage.completion_tokens, estimated, outcome
                ),
                **_split_fields(settled),
            }
            if response_id:
                extra["providerResponseId"] = response_id
            fields = {**admission.event_fields, "tokens": charged}
            await ledger.add_event(usage_event("ALLOWED", now=now, **fields, extra=extra))
        return charged

    # --- calls --------------------------------------------------------------------------

    def _call(self, request: ChatRequest, admission: Admission) -> ChatCall:
        return ChatCall(
            request.route,
            request.messages,
            admission.max_tokens,
            request.stream,
            {k: v for k, v in request.options.items() if k not in ("stream", "stream_options")},
        )

    async def complete(
        self, principal: Principal, request: ChatRequest, request_id: str | None
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """A whole chat.completion and the headers that go with it."""
        admission = await self.admit(principal, request, request_id)
        try:
            try:
                completion = await self.adapters[request.route.provider].complete(
                    self._call(request, admission)
                )
            except ProviderError as exc:
                await self._refund(admission, "PROVIDER_FAILURE", {"reason": exc.message})
                raise provider_http_error(exc) from None
            usage = completion.usage
            estimated = usage is None
            if usage is None:
                usage = Usage(
                    admission.prompt_estimate,
                    admission.tokenizer.count(_answer_text(completion.body)),
                )
                completion.body["usage"] = usage.as_openai()
            charged = await self.settle(
                admission,
                usage,
                estimated=estimated,
                outcome="completed",
                response_id=str(completion.body.get("id") or "") or None,
            )
            return completion.body, admission.rate_limit_headers(charged)
        finally:
            if not admission.settled:
                # Cancelled or failed mid-flight: give everything back now; if even this is cut
                # short, the sweeper refunds the expired reservation later.
                await asyncio.shield(self._refund(admission, "ABANDONED", {}))

    async def open_stream(
        self, principal: Principal, request: ChatRequest, request_id: str | None
    ) -> MeteredStream:
        """A provider stream already open (so failures before output are HTTP errors)."""
        admission = await self.admit(principal, request, request_id)
        try:
            stream = await self.adapters[request.route.provider].open_stream(
                self._call(request, admission)
            )
        except ProviderError as exc:
            await self._refund(admission, "PROVIDER_FAILURE", {"reason": exc.message})
            raise provider_http_error(exc) from None
        except BaseException:
            await asyncio.shield(self._refund(admission, "ABANDONED", {}))
            raise
        return MeteredStream(self, admission, stream, include_usage=request.include_usage)


def _answer_text(body: dict[str, Any]) -> str:
    choices = body.get("choices")
    if not isinstance(choices, list):
        return ""
    return "".join(
        message_text((c.get("message") or {}).get("content", ""))
        for c in choices
        if isinstance(c, dict)
    )


def _split_fields(settled: SettledReservation) -> dict[str, Any]:
    return {"allowanceTokens": settled.used_allowance, "creditTokens": settled.used_credit}


class MeteredStream:
    """The client's side of a provider stream: OpenAI SSE bytes, the usage chunk removed when
    the client did not ask for it, and one settlement whichever way the stream ends."""

    def __init__(
        self,
        service: InferenceService,
        admission: Admission,
        stream: ChatStream,
        *,
        include_usage: bool,
    ) -> None:
        self.service = service
        self.admission = admission
        self._stream = stream
        self._include_usage = include_usage
        self._pieces: list[str] = []
        self._outcome = "client_disconnected"
        self._response_id: str | None = None
        self._settling: asyncio.Future[None] | None = None

    def headers(self) -> dict[str, str]:
        return self.admission.rate_limit_headers()

    @property
    def outcome(self) -> str:
        """ "completed" once the stream reached its proper end (idempotent replays keep only
        those); "provider_cut", "client_disconnected"… otherwise."""
        return self._outcome

    async def events(self) -> AsyncIterator[bytes]:
        """SSE bytes for the client; ends with `[DONE]`, or with an error event when the
        provider broke off (then no `[DONE]`: the SDK raises on the error event)."""
        try:
            async for chunk in self._stream.chunks():
                if self._response_id is None and isinstance(chunk.get("id"), str):
                    self._response_id = chunk["id"]
                choices = chunk.get("choices") or ()
                for choice in choices:
                    delta = choice.get("delta") if isinstance(choice, dict) else None
                    if isinstance(delta, dict):
                        for key in ("content", "reasoning_content"):
                            text = delta.get(key)
                            if isinstance(text, str) and text:
                                self._pieces.append(text)
                if not self._include_usage:
                    if not choices and "usage" in chunk:
                        continue  # the usage chunk we asked for, not the client
                    chunk.pop("usage", None)
                yield b"data: " + orjson.dumps(chunk) + b"\n\n"
        except ProviderError as exc:
            self._outcome = "provider_cut"
            # Settled before the client sees the end, so a quota read after it is exact.
            await asyncio.shield(self._settle())
            error = {
                "error": {
                    "message": f"The provider's stream broke off: {exc.message}",
                    "type": "server_error",
                    "param": None,
                    "code": "provider_stream_cut",
                }
            }
            yield b"data: " + orjson.dumps(error) + b"\n\n"
            return
        self._outcome = "completed"
        await asyncio.shield(self._settle())
        yield b"data: [DONE]\n\n"

    async def finish(self) -> None:
        """Close the provider stream and settle if the stream did not (call it shielded)."""
        with contextlib.suppress(Exception):
            await self._stream.aclose()
        await self._settle()

    def _settle(self) -> asyncio.Future[None]:
        """The one settlement of this stream (started once; later calls await the same)."""
        if self._settling is None:
            self._settling = asyncio.ensure_future(self._settle_once())
        return self._settling

    async def _settle_once(self) -> None:
        admission = self.admission
        if admission.settled:
            return
        reported = self._stream.usage
        if self._outcome == "completed" and reported is not None:
            usage, estimated = reported, False
        else:
            # Cut, abandoned, or no usage reported: the prompt plus what was streamed.
            prompt = reported.prompt_tokens if reported is not None else admission.prompt_estimate
            streamed = admission.tokenizer.count("".join(self._pieces))
            usage, estimated = Usage(prompt, streamed), True
        try:
            await self.service.settle(
                admission,
                usage,
                estimated=estimated,
                outcome=self._outcome,
                response_id=self._response_id,
            )
        except Exception:
            log.exception("stream settlement failed; the sweeper will refund the reservation")
