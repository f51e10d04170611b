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
