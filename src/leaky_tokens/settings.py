"""The one typed settings root: environment variables (LEAKY_*), an optional TOML file, defaults.

Nested sections use `__` in environment names, e.g. `LEAKY_AUTH__JWT_TTL_SECONDS=600` or
`LEAKY_PORTS__GATEWAY=9080`. `REDIS_URL` is also read without the prefix.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

SERVICES: tuple[str, ...] = ("gateway", "auth", "tokens", "analytics", "qwen", "gemini", "openai")
PROVIDERS: tuple[str, ...] = ("openai", "qwen", "gemini")

Port = int
Exposure = Literal["open", "local", "internal", "off"]


class Ports(BaseModel):
    """Listening port per service; 0 asks the OS for a free one (used by tests)."""

    gateway: Port = Field(8080, ge=0, le=65535)
    auth: Port = Field(8081, ge=0, le=65535)
    tokens: Port = Field(8082, ge=0, le=65535)
    analytics: Port = Field(8083, ge=0, le=65535)
    qwen: Port = Field(8091, ge=0, le=65535)
    gemini: Port = Field(8092, ge=0, le=65535)
    openai: Port = Field(8093, ge=0, le=65535)


class Urls(BaseModel):
    """Where each service is reached by the others. Empty means http://{host}:{port}."""

    gateway: str = ""
    auth: str = ""
    tokens: str = ""
    analytics: str = ""
    qwen: str = ""
    gemini: str = ""
    openai: str = ""


class LoginLimit(BaseModel):
    attempts: int = Field(ge=1)
    window_seconds: int = Field(ge=1, le=7 * 86400)


class AuthSettings(BaseModel):
    database_url: str = ""
    jwt_issuer: str = "leaky-tokens"
    jwt_ttl_seconds: int = Field(3600, ge=30, le=7 * 24 * 3600)
    signing_key_rotation_days: float = Field(30.0, gt=0)
    signing_key_refresh_seconds: float = Field(30.0, gt=0)
    password_min_length: int = Field(8, ge=4, le=128)
    # Refuse the N commonest passwords of the shipped list (auth/common-passwords.txt.gz,
    # 19,640 entries, commonest first); 0 refuses none. The plan registers with "password123",
    # number 452 on the list, so the default stops short of it: see README, "Security model".
    password_refuse_commonest: int = Field(100, ge=0, le=20_000)
    argon2_time_cost: int = Field(2, ge=1)
    argon2_memory_kib: int = Field(19456, ge=1024)
    argon2_parallelism: int = Field(1, ge=1)
    # Login throttling counts every attempt before the password is checked (atomically, in the
    # shared fixed-window limiter), so concurrent guesses cannot race past a limit:
    # - per client address (as the edge established it: `trusted_proxies`);
    # - per account, from addresses it never logged in from, in widening windows: a back-off
    #   that slows a guesser to a few tries a minute, then fewer an hour, then a day;
    # - per (account, address it logged in from before): the owner's own window, which the
    #   guesser's failures elsewhere never fill, so an attack does not lock the owner out.
    login_max_attempts_per_client: int = Field(60, ge=1)
    login_client_window_seconds: int = Field(900, ge=1, le=86400)
    login_account_limits: list[LoginLimit] = Field(
        default_factory=lambda: [
            LoginLimit(attempts=5, window_seconds=60),
            LoginLimit(attempts=20, window_seconds=3600),
            LoginLimit(attempts=100, window_seconds=86400),
        ],
        min_length=1,
    )
    login_known_address_limit: LoginLimit = LoginLimit(attempts=10, window_seconds=60)
    # Registrations refused because the username or email exists, per client address: past
    # this, 429 (probing which accounts exist costs time).
    registration_conflicts_per_client: int = Field(10, ge=1)
    # Redis keys of the login and registration throttles (deployments sharing a Redis, and
    # test stacks, give distinct prefixes: the windows outlive a process).
    throttle_key_prefix: str = Field("lt:auth:", min_length=1)
    registration_conflict_window_seconds: int = Field(3600, ge=1, le=86400)
    # Active (neither revoked nor expired) API keys one user may hold at once.
    max_active_api_keys_per_user: int = Field(10, ge=1, le=10_000)
    # Signing keys are stored encrypted (PKCS#8, the `cryptography` library's best available
    # scheme) under this passphrase, or the first line of this file, when either is given.
    signing_key_passphrase: SecretStr = SecretStr("")
    signing_key_passphrase_file: Path | None = None

    def signing_passphrase(self) -> bytes | None:
        """The passphrase the signing keys are encrypted under, if one is configured."""
        if self.signing_key_passphrase.get_secret_value():
            return self.signing_key_passphrase.get_secret_value().encode()
        if self.signing_key_passphrase_file is not None:
            lines = self.signing_key_passphrase_file.read_text().splitlines()
            secret = lines[0].strip() if lines else ""
            if not secret:
                raise ValueError(f"{self.signing_key_passphrase_file} holds no passphrase")
            return secret.encode()
        return None


class AuthClientSettings(BaseModel):
    """How services other than auth verify callers."""

    api_key_cache_seconds: float = Field(2.0, ge=0)
    jwks_min_refresh_seconds: float = Field(5.0, ge=0)
    timeout_seconds: float = Field(3.0, gt=0)
    # Cached API keys are dropped the moment the auth service's revocation feed (long-polled)
    # or, with REDIS_URL, its pub/sub announcement says so; this is the least time between two
    # reads of the feed (and the wait before asking again when it cannot be read).
    revocation_poll_seconds: float = Field(0.3, gt=0, le=60)
    # While the feed cannot be read, bearer tokens are checked against the principal changes
    # already known for this long, then refused (503) until the feed answers again.
    feed_grace_seconds: float = Field(10.0, ge=0, le=3600)


class TokensSettings(BaseModel):
    database_url: str = ""
    quota_window_seconds: int = Field(86400, ge=1)
    bucket_capacity: int = Field(1000, ge=1)
    bucket_leak_per_second: float = Field(10.0, gt=0)
    # Per-role multipliers of bucket capacity and leak rate (the caller's best role counts).
    role_multipliers: dict[str, float] = {"USER": 1.0, "ADMIN": 1.0}
    max_quota_tokens: int = Field(10**12, ge=1)
    reservation_ttl_seconds: float = Field(120.0, gt=0)
    sweep_interval_seconds: float = Field(5.0, gt=0)
    # How often agent sessions past their lifetime are ended (their budget given back); the
    # credential itself stops working at the expiry, whatever this is.
    session_sweep_interval_seconds: float = Field(1.0, gt=0)
    provider_timeout_seconds: float = Field(3.0, gt=0)
    provider_attempts: int = Field(2, ge=1, le=5)
    provider_max_concurrent: int = Field(64, ge=1)
    breaker_window_size: int = Field(20, ge=1)
    breaker_minimum_calls: int = Field(10, ge=1)
    breaker_failure_rate: float = Field(0.5, gt=0, le=1)
    breaker_open_seconds: float = Field(30.0, gt=0)
    # Purchases (the saga)
    max_purchase_tokens: int = Field(10_000_000, ge=1)
    # Per user per UTC day, checked before a purchase reaches the payment adapter (purchases
    # that ended FAILED do not count).
    max_purchases_per_user_per_day: int = Field(100, ge=1)
    max_purchase_tokens_per_user_per_day: int = Field(10_000_000, ge=1)
    flags: dict[str, bool] = Field(
        default_factory=dict,
        description='Feature flags applied at start-up, e.g. {"saga.simulate-failure": true}',
    )
    saga_poll_interval_seconds: float = Field(0.5, gt=0)
    saga_lease_seconds: float = Field(15.0, gt=0)
    saga_max_attempts: int = Field(5, ge=1)
    saga_retry_base_seconds: float = Field(0.5, gt=0)

    @model_validator(mode="after")
    def _breaker_reachable(self) -> TokensSettings:
        if self.breaker_minimum_calls > self.breaker_window_size:
            raise ValueError("breaker_minimum_calls must not exceed breaker_window_size")
        return self


class CatalogueModel(BaseModel):
    """One model of the /v1 catalogue: who serves it, under which name, and its limits."""

    provider: Literal["openai", "qwen", "gemini"]
    upstream_model: str = Field(min_length=1)  # the name the provider knows it by
    context_window: int = Field(ge=16)  # prompt + output tokens the model accepts
    max_output_tokens: int = Field(ge=1)  # its longest answer (the allowance when none asked)
    # "embedding" models serve /v1/embeddings only; "chat" models the rest (issue 12).
    kind: Literal["chat", "embedding"] = "chat"

    @model_validator(mode="after")
    def _fits(self) -> CatalogueModel:
        if self.max_output_tokens > self.context_window:
            raise ValueError("max_output_tokens must not exceed context_window")
        return self


def _model(
    provider: str, upstream: str, context: int, output: int, kind: str = "chat"
) -> CatalogueModel:
    return CatalogueModel.model_validate(
        {
            "provider": provider,
            "upstream_model": upstream,
            "context_window": context,
            "max_output_tokens": output,
            "kind": kind,
        }
    )


# Served by the stubs out of the box; each id also answers as "<provider>/<id>".
DEFAULT_CATALOGUE: dict[str, CatalogueModel] = {
    "gpt-4o-mini": _model("openai", "gpt-4o-mini", 128_000, 16_384),
    "gpt-4.1-mini": _model("openai", "gpt-4.1-mini", 1_047_576, 32_768),
    "qwen-turbo": _model("qwen", "qwen-turbo", 131_072, 8_192),
    "qwen-plus": _model("qwen", "qwen-plus", 131_072, 8_192),
    "gemini-2.5-flash": _model("gemini", "gemini-2.5-flash", 1_048_576, 65_536),
    "gemini-2.0-flash": _model("gemini", "gemini-2.0-flash", 1_048_576, 8_192),
    # Embedding models (issue 12): the context is the longest input; no output is generated.
    "text-embedding-3-small": _model("openai", "text-embedding-3-small", 8_191, 1, "embedding"),
    "text-embedding-v3": _model("qwen", "text-embedding-v3", 8_192, 1, "embedding"),
    "gemini-embedding-001": _model("gemini", "gemini-embedding-001", 2_048, 1, "embedding"),
}


class ProviderEndpoint(BaseModel):
    """Where the /v1 adapters reach one provider's real API. Empty `base_url`: the stub
    (OpenAI `<stub>/v1`, DashScope `<stub>/compatible-mode/v1`, Gemini `<stub>/v1beta`); a
    real one is e.g. https://api.openai.com/v1, https://dashscope-intl.aliyuncs.com/
    compatible-mode/v1 or https://generativelanguage.googleapis.com/v1beta. The key is a secret:
    never logged, never shown in a repr."""

    base_url: str = ""
    api_key: SecretStr = SecretStr("")


class InferenceSettings(BaseModel):
    """The OpenAI-compatible /v1 API of the token service (issue 11)."""

    models: dict[str, CatalogueModel] = Field(default_factory=lambda: dict(DEFAULT_CATALOGUE))
    providers: dict[str, ProviderEndpoint] = Field(default_factory=dict)
    # A request is refused (nothing charged) when the pool cannot cover its prompt and this
    # many answer tokens; otherwise the provider's max_tokens is lowered to what it covers.
    min_answer_tokens: int = Field(16, ge=1)
    # One plain call, first byte to last; for a stream, the wait for its first event.
    timeout_seconds: float = Field(120.0, gt=0)
    connect_timeout_seconds: float = Field(5.0, gt=0)
    # The longest silence between two events of a stream before it counts as cut.
    stream_idle_seconds: float = Field(60.0, gt=0)
    # Tries in total; another try only when nothing reached the provider (connection refused)
    # or it answered 429/503 with a retry hint no longer than `max_retry_wait_seconds`.
    attempts: int = Field(2, ge=1, le=5)
    max_retry_wait_seconds: float = Field(2.0, ge=0)
    max_connections: int = Field(512, ge=1)
    # A /v1 reservation the sweeper may refund (a crashed process): longer than any call can
    # last, streams included (the gateway cuts one at gateway.inference_answer_timeout_seconds).
    reservation_ttl_seconds: float = Field(1200.0, gt=0)
    # Idempotent inference (issue 12): how long a key's answer is kept, how long a call in
    # flight holds its key before another attempt may take it over (a crashed call), and how
    # often expired keys are swept.
    idempotency_ttl_seconds: float = Field(86_400.0, gt=0)
    idempotency_lease_seconds: float = Field(300.0, gt=0)
    idempotency_sweep_seconds: float = Field(60.0, gt=0)
    # Stored answers larger than this are not kept (the call still succeeds; a replay re-runs).
    idempotency_max_answer_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # How long `GET /v1/responses/{id}` passes on to OpenAI for the caller that created the
    # (stored) response; OpenAI itself keeps stored responses 30 days.
    stored_response_ttl_seconds: float = Field(30 * 86_400.0, gt=0)

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: dict[str, ProviderEndpoint]) -> dict[str, ProviderEndpoint]:
        unknown = sorted(set(value) - set(PROVIDERS))
        if unknown:
            raise ValueError(f"unknown providers {unknown}; expected some of {list(PROVIDERS)}")
        return value

    @field_validator("models")
    @classmethod
    def _plain_ids(cls, value: dict[str, CatalogueModel]) -> dict[str, CatalogueModel]:
        for model_id in value:
            if not model_id or model_id.strip() != model_id:
                raise ValueError(f"model id {model_id!r} must be non-empty, without spaces")
        return value


class AnalyticsSettings(BaseModel):
    database_url: str = ""
    # Retention: raw usage events are kept this long, then summed into per-minute rollups
    # (kept without limit) and deleted; purchase events are deleted past their own retention.
    retention_enabled: bool = True
    raw_retention_seconds: float = Field(7 * 86_400.0, ge=60)
    purchase_retention_seconds: float = Field(90 * 86_400.0, ge=60)
    dead_letter_retention_seconds: float = Field(30 * 86_400.0, ge=60)
    retention_batch: int = Field(5000, ge=1, le=100_000)
    retention_every_seconds: float = Field(60.0, gt=0)
    # Pacing of the retention sweep (shared/pacing.py), as for events.outbox_sweep_*: the share
    # of time it may spend in roll-up/purge transactions, the shortest pause between two, and
    # the step duration above which the next step is halved.
    retention_duty_cycle: float = Field(0.05, gt=0, le=1)
    retention_pause_seconds: float = Field(0.005, ge=0, le=30)
    retention_slow_batch_seconds: float = Field(0.1, gt=0)


class EventsSettings(BaseModel):
    """How events travel from the tokens outbox to analytics (issue 5).

    transport "auto" picks Redis Streams when REDIS_URL is set, else HTTP push to analytics.
    """

    transport: Literal["auto", "http", "redis"] = "auto"
    relay_enabled: bool = True
    relay_batch_size: int = Field(200, ge=1, le=1000)
    relay_poll_seconds: float = Field(0.025, gt=0, le=60)
    relay_max_backoff_seconds: float = Field(30.0, gt=0)
    publish_timeout_seconds: float = Field(10.0, gt=0)
    stream_prefix: str = Field("lt:events:", min_length=1)
    # A safety cap per stream; the consumer trims what every group has acknowledged.
    stream_maxlen: int = Field(1_000_000, ge=1000)
    consumer_group: str = Field("analytics", min_length=1)
    reclaim_idle_seconds: float = Field(30.0, gt=0)
    # The outbox sweeper (token service): published rows older than the retention are purged
    # in batches of at most outbox_sweep_batch rows, one short transaction each.
    outbox_sweep_enabled: bool = True
    outbox_retention_seconds: float = Field(86_400.0, ge=0)
    outbox_sweep_batch: int = Field(1000, ge=1, le=10_000)
    outbox_sweep_every_seconds: float = Field(30.0, gt=0)
    # Pacing, so a backlog purge yields to /consume (shared/pacing.py): after a batch that took
    # t seconds the sweeper pauses at least t * (1 - d) / d (d = duty cycle: the share of time it
    # may spend deleting) and at least outbox_sweep_pause_seconds; a batch slower than
    # outbox_sweep_slow_batch_seconds halves the next one (down to batch / 16).
    outbox_sweep_duty_cycle: float = Field(0.05, gt=0, le=1)
    outbox_sweep_pause_seconds: float = Field(0.005, ge=0, le=30)
    outbox_sweep_slow_batch_seconds: float = Field(0.1, gt=0)


class RouteLimit(BaseModel):
    """A rate limit replacing the default for matching requests: `path` is exact or a prefix
    ending in `/**`; `method` is one HTTP method or `*`. The most specific match wins."""

    path: str = Field(pattern=r"^/")
    method: str = "*"
    limit: int = Field(ge=1)
    window_seconds: int = Field(ge=1, le=86400)

    @field_validator("method")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()


# Reached without credentials at the gateway ("METHOD /path"; a trailing /** is a prefix).
DEFAULT_PUBLIC_ROUTES: tuple[str, ...] = (
    "POST /api/v1/auth/register",
    "POST /api/v1/auth/login",
    "GET /api/v1/auth/api-keys/validate",
    "GET /api/v1/auth/jwks",
    "GET /oauth2/jwks",
    "GET /api/v1/auth/health",
    "GET /api/v1/tokens/status",
    "GET /api/v1/analytics/health",
    "GET /api/v1/qwen/health",
    "GET /api/v1/gemini/health",
    "GET /api/v1/openai/health",
)


class RedisSettings(BaseModel):
    """How every service uses Redis when REDIS_URL is set: each call is bounded by these
    timeouts; after a failure Redis is not asked again for `fail_fast_seconds` (then one call
    probes it). `on_failure`: "fallback" decides limits and buckets in each process's memory
    meanwhile (counted in redis_fallback_decisions_total), "closed" answers 503."""

    connect_timeout_seconds: float = Field(0.5, gt=0, le=30)
    command_timeout_seconds: float = Field(0.5, gt=0, le=30)
    fail_fast_seconds: float = Field(1.0, ge=0, le=60)
    on_failure: Literal["fallback", "closed"] = "fallback"
    max_connections: int = Field(64, ge=1)


class GatewaySettings(BaseModel):
    connect_timeout_seconds: float = Field(2.0, gt=0)
    # From sending the request until the answer's headers are in; also the longest silence
    # while the body streams.
    upstream_timeout_seconds: float = Field(10.0, gt=0)
    # The whole answer, last byte included (a long stream is cut here).
    answer_timeout_seconds: float = Field(300.0, gt=0)
    # For the OpenAI-compatible /v1 routes only, in place of `upstream_timeout_seconds`: a
    # plain completion's headers come once the provider has answered whole, and a stream may
    # fall silent while a model thinks (the token service bounds both itself, a little sooner).
    inference_upstream_timeout_seconds: float = Field(150.0, gt=0)
    # ... and in place of `answer_timeout_seconds`: a long reasoning stream may run for minutes
    # (keep it below inference.reservation_ttl_seconds, or the sweeper refunds a live call).
    inference_answer_timeout_seconds: float = Field(900.0, gt=0)
    # How long a request waits for one of the upstream's connections before a 503.
    pool_wait_seconds: float = Field(1.0, ge=0)
    health_timeout_seconds: float = Field(2.0, gt=0)
    max_connections_per_upstream: int = Field(256, ge=1)
    # How long a client may take to send its request body (408 after).
    client_body_timeout_seconds: float = Field(10.0, gt=0)
    # Requests with more headers, or more header bytes, are refused (431).
    max_headers: int = Field(100, ge=1)
    max_header_bytes: int = Field(32 * 1024, ge=1024)
    # Every request of a client address, counted in each gateway process before any
    # credential is checked (a flood guard; set it above what a busy NAT sends).
    address_limit_requests: int = Field(1200, ge=1)
    address_limit_window_seconds: int = Field(60, ge=1, le=86400)
    # Default limit per principal (API key, else user, else client IP).
    rate_limit_requests: int = Field(120, ge=1)
    rate_limit_window_seconds: int = Field(60, ge=1, le=86400)
    # Per user across all their API keys and tokens, besides each key's own limit.
    user_limit_requests: int = Field(600, ge=1)
    user_limit_window_seconds: int = Field(60, ge=1, le=86400)
    # Unknown, revoked and expired API keys are remembered this long (no auth call meanwhile).
    negative_cache_seconds: float = Field(5.0, ge=0, le=300)
    route_limits: list[RouteLimit] = []
    rate_limit_key_prefix: str = Field("lt:gw:", min_length=1)  # Redis keys
    public_routes: list[str] = list(DEFAULT_PUBLIC_ROUTES)
    # Circuit breaker per upstream: connection errors, timeouts and 503s marked as the
    # upstream's own outage (X-Service-Outage) count as failures.
    breaker_window_size: int = Field(20, ge=1)
    breaker_minimum_calls: int = Field(10, ge=1)
    breaker_failure_rate: float = Field(0.5, gt=0, le=1)
    breaker_open_seconds: float = Field(5.0, ge=0)
    breaker_half_open_calls: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _breaker_reachable(self) -> GatewaySettings:
        if self.breaker_minimum_calls > self.breaker_window_size:
            raise ValueError("breaker_minimum_calls must not exceed breaker_window_size")
        return self

    @field_validator("public_routes")
    @classmethod
    def _routes(cls, value: list[str]) -> list[str]:
        for entry in value:
            method, _, path = entry.partition(" ")
            if not method or not path.startswith("/"):
                raise ValueError(f"{entry!r} is not 'METHOD /path'")
        return value


class AgentProduct(BaseModel):
    """A product of the agent API: a pool of catalogue models a session may use. "dynamic" may
    move between its models (and their providers) on rotation; "static" stays on its one."""

    product_no: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    type: Literal["dynamic", "static"]
    models: list[str] = Field(min_length=1)
    description: str = ""

    @model_validator(mode="after")
    def _static_has_one(self) -> AgentProduct:
        if self.type == "static" and len(self.models) != 1:
            raise ValueError("a static product names exactly one model")
        return self


class AgentSettings(BaseModel):
    """The agent API on the gateway port (issue 13): /v1/health, /v1/account/**, /v1/sessions/**…"""

    # Its own limit per caller (API key, else Bearer user, else client address), besides the
    # gateway's; answers carry X-RateLimit-Limit/Remaining/Reset, a 429 also Retry-After.
    rate_limit_requests: int = Field(300, ge=1)
    rate_limit_window_seconds: int = Field(60, ge=1, le=86400)
    # Session limits.
    default_lifetime_seconds: int = Field(3600, ge=1)
    max_lifetime_seconds: int = Field(7 * 86400, ge=1)
    max_token_budget: int = Field(10_000_000, ge=1)
    # Health of a session over its latest `health_window_events` events (agent reports and what
    # the gateway saw): "unhealthy" when the success rate is below `unhealthy_success_rate` or
    # the last `unhealthy_consecutive_errors` events all failed; "degraded" below
    # `degraded_success_rate` or when the mean latency passes `degraded_latency_ms`; else
    # "healthy" (also with fewer than `health_min_events` events).
    health_window_events: int = Field(100, ge=1, le=1000)
    health_min_events: int = Field(3, ge=1)
    degraded_success_rate: float = Field(0.9, ge=0, le=1)
    unhealthy_success_rate: float = Field(0.5, ge=0, le=1)
    unhealthy_consecutive_errors: int = Field(5, ge=1)
    degraded_latency_ms: int = Field(5000, ge=1)
    # The base URL agents are given (proxy.full_url); empty: the gateway's own URL.
    public_base_url: str = ""
    # Products; empty: one dynamic product over the whole catalogue and a static one per model.
    products: list[AgentProduct] = []
    # `make bench` latency aims, P95 in milliseconds (spec TS-4).
    p95_health_ms: float = Field(500.0, gt=0)
    p95_account_info_ms: float = Field(1000.0, gt=0)
    p95_session_get_ms: float = Field(1000.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> AgentSettings:
        if self.unhealthy_success_rate > self.degraded_success_rate:
            raise ValueError("unhealthy_success_rate must not exceed degraded_success_rate")
        if self.default_lifetime_seconds > self.max_lifetime_seconds:
            raise ValueError("default_lifetime_seconds must not exceed max_lifetime_seconds")
        return self


class StubSettings(BaseModel):
    """How the provider emulators (qwen, gemini, openai stubs) answer; faults come at run time."""

    chunk_delay_ms: int = Field(0, ge=0, le=60_000)  # pause before each streamed chunk
    tokens_per_chunk: int = Field(4, ge=1, le=1000)  # reply tokens per streamed chunk
    reply_min_tokens: int = Field(12, ge=1, le=4096)  # a reply's natural length lies in
    reply_max_tokens: int = Field(48, ge=1, le=4096)  # [min, max], picked by the prompt's hash
    # When set, the emulated APIs answer only this key (Bearer, x-goog-api-key or ?key=), so a
    # test can tell the adapters send the configured key; empty: any non-empty key.
    api_key: str = ""

    @model_validator(mode="after")
    def _reply_range(self) -> StubSettings:
        if self.reply_min_tokens > self.reply_max_tokens:
            raise ValueError("reply_min_tokens must not exceed reply_max_tokens")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LEAKY_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    host: str = "127.0.0.1"
    data_dir: Path = Path("var")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    auto_migrate: bool = True
    redis_url: str = Field("", validation_alias=AliasChoices("LEAKY_REDIS_URL", "REDIS_URL"))
    # Shared secret of internal endpoints (event ingestion); empty: generated once and kept in
    # data_dir/internal_token (0600), so processes sharing a data directory agree.
    internal_token: str = ""
    admin_username: str = ""
    admin_password: str = ""
    admin_email: str = ""
    # Who may read each service's /metrics and its API docs (/docs, /redoc, /openapi.json):
    # "open" anyone; "local" loopback peers, others with X-Internal-Token; "internal" only with
    # X-Internal-Token; "off" not served. /health stays open (load balancers need it).
    metrics_exposure: Exposure = "local"
    docs_exposure: Exposure = "local"
    # Peers (IPs or CIDRs) whose X-Forwarded-For is believed, by the gateway for its clients'
    # addresses and by the auth service's login throttle: the gateway and any load balancer in
    # front. The default believes loopback only (the all-in-one gateway calls auth from there).
    trusted_proxies: list[str] = ["127.0.0.0/8", "::1/128"]
    ports: Ports = Ports()
    urls: Urls = Urls()
    auth: AuthSettings = AuthSettings()
    auth_client: AuthClientSettings = AuthClientSettings()
    tokens: TokensSettings = TokensSettings()
    inference: InferenceSettings = InferenceSettings()
    analytics: AnalyticsSettings = AnalyticsSettings()
    events: EventsSettings = EventsSettings()
    gateway: GatewaySettings = GatewaySettings()
    agents: AgentSettings = AgentSettings()
    stubs: StubSettings = StubSettings()
    redis: RedisSettings = RedisSettings()

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            ipaddress.ip_network(entry, strict=False)  # ValueError names the bad entry
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @model_validator(mode="after")
    def _redis_events_need_redis(self) -> Settings:
        if self.events.transport == "redis" and not self.redis_url:
            raise ValueError("events.transport 'redis' needs REDIS_URL")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("toml_file"):
            sources.append(TomlConfigSettingsSource(settings_cls))
        return tuple(sources)

    def database_url(self, service: str) -> str:
        """The service's own database: its setting, else a SQLite file in the data directory."""
        configured: str = getattr(self, service).database_url
        if configured:
            return configured
        return f"sqlite+aiosqlite:///{(self.data_dir / f'{service}.db').as_posix()}"

    def event_transport(self) -> Literal["http", "redis"]:
        """The event transport in use: the explicit setting, else Redis when REDIS_URL is set."""
        if self.events.transport == "auto":
            return "redis" if self.redis_url else "http"
        return self.events.transport

    def url_of(self, service: str) -> str:
        configured: str = getattr(self.urls, service)
        if configured:
            return configured.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host  # noqa: S104
        return f"http://{host}:{getattr(self.ports, service)}"

    def with_ports(self, ports: dict[str, int]) -> Settings:
        """A copy with the ports the OS actually gave (when 0 was asked for)."""
        return self.model_copy(update={"ports": self.ports.model_copy(update=ports)})


class SettingsError(Exception):
    """Settings that cannot be used; the message names each bad setting."""


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings once (CLI entry). Environment wins over the TOML file."""
    try:
        if config_file is not None:
            if not config_file.is_file():
                raise SettingsError(f"config file not found: {config_file}")
            try:
                tomllib.loads(config_file.read_text())
            except tomllib.TOMLDecodeError as exc:
                raise SettingsError(f"config file {config_file} is not valid TOML: {exc}") from exc
            bound = type(
                "FileSettings",
                (Settings,),
                {"model_config": {**Settings.model_config, "toml_file": config_file}},
            )
            loaded: Settings = bound(**overrides)
            return loaded
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from exc
