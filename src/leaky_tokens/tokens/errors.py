"""Domain errors of the token service."""

from __future__ import annotations

from leaky_tokens.shared.errors import AppError, InvalidRequest, NotFound


class InsufficientQuota(AppError):
    status = 402
    code = "INSUFFICIENT_QUOTA"
    default_message = "insufficient token quota"


class RateLimited(AppError):
    status = 429
    code = "RATE_LIMITED"
    default_message = "rate limit exceeded"


class TokensExceedCapacity(InvalidRequest):
    code = "TOKENS_EXCEED_CAPACITY"


class RemainingExceedsTotal(InvalidRequest):
    """A pool cannot hold more tokens than its total (admin API and CLI)."""

    code = "INVALID_REQUEST"


class QuotaNotFound(NotFound):
    code = "QUOTA_NOT_FOUND"
    default_message = "no quota for this owner and provider"


class UnknownProvider(InvalidRequest):
    code = "INVALID_REQUEST"


class IdempotencyConflict(AppError):
    status = 409
    code = "IDEMPOTENCY_CONFLICT"
    default_message = "Idempotency-Key was already used with a different request"


class SagaNotFound(NotFound):
    code = "SAGA_NOT_FOUND"
    default_message = "purchase not found"


class PurchasesDisabled(AppError):
    status = 503
    code = "PURCHASES_DISABLED"
    default_message = "purchases are switched off (feature flag saga.purchases-enabled)"


class UnknownFlag(NotFound):
    code = "FLAG_NOT_FOUND"
    default_message = "no such feature flag"


class PurchaseLimitExceeded(AppError):
    status = 429
    code = "PURCHASE_LIMIT_EXCEEDED"
    default_message = "daily purchase limit reached"
