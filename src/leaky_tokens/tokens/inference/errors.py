"""Domain errors of the /v1 inference API, each with its OpenAI `type` and `code`."""

from __future__ import annotations

from leaky_tokens.shared.errors import AppError, Forbidden, InvalidRequest, NotFound


class ModelNotFound(NotFound):
    code = "MODEL_NOT_FOUND"
    default_message = "no such model"
    openai_code = "model_not_found"


class InvalidInferenceRequest(InvalidRequest):
    """A body the API cannot serve; `details[0].field` names the parameter (OpenAI `param`)."""

    openai_type = "invalid_request_error"


class ContextLengthExceeded(InvalidInferenceRequest):
    code = "CONTEXT_LENGTH_EXCEEDED"
    openai_code = "context_length_exceeded"


class OrgNotAllowed(Forbidden):
    code = "ORG_NOT_ALLOWED"
    openai_code = "permission_denied"


class QuotaExhausted(AppError):
    """The pool cannot cover the prompt and a minimum answer: nothing was charged. A 429 with
    OpenAI's `insufficient_quota` (and `x-should-retry: false`, set by the renderer)."""

    status = 429
    code = "INSUFFICIENT_QUOTA"
    default_message = (
        "You exceeded your current token quota for this provider; buy more tokens or wait for "
        "the quota window to reset."
    )
    openai_type = "insufficient_quota"
    openai_code = "insufficient_quota"


class BucketFull(AppError):
    """The caller's leaky bucket is full for now: retry after `Retry-After`."""

    status = 429
    code = "RATE_LIMITED"
    default_message = "Rate limit reached for tokens; please try again shortly."
    openai_type = "tokens"
    openai_code = "rate_limit_exceeded"


class ProviderRateLimited(AppError):
    """The provider throttled us (a transient 429); its retry hint is passed on."""

    status = 429
    code = "PROVIDER_RATE_LIMITED"
    default_message = "The provider is rate limiting requests; please try again shortly."
    openai_type = "requests"
    openai_code = "rate_limit_exceeded"


class ProviderFailed(AppError):
    """The provider gave no usable answer (5xx, garbage, refused connection): 502."""

    status = 502
    code = "PROVIDER_ERROR"
    default_message = "The provider failed to answer."
    openai_type = "server_error"
    openai_code = "provider_error"


class ProviderUnavailable(AppError):
    """The provider said it is unavailable (503). Not our outage: no X-Service-Outage."""

    status = 503
    code = "PROVIDER_UNAVAILABLE"
    default_message = "The provider is temporarily unavailable."
    openai_type = "server_error"
    openai_code = "provider_unavailable"


class ProviderTimeout(AppError):
    status = 504
    code = "PROVIDER_TIMEOUT"
    default_message = "The provider did not answer in time."
    openai_type = "server_error"
    openai_code = "provider_timeout"


class ResponseNotFound(NotFound):
    code = "RESPONSE_NOT_FOUND"
    default_message = "no such response"
    openai_type = "invalid_request_error"
    openai_code = "response_not_found"
