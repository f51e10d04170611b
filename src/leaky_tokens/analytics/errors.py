"""Domain errors of the analytics service."""

from __future__ import annotations

from leaky_tokens.shared.errors import Forbidden, InvalidRequest


class UnknownProvider(InvalidRequest):
    code = "INVALID_REQUEST"


class ForeignUsage(Forbidden):
    """A USER asked for another user's events."""

    default_message = "you may only read your own usage"


class TooManyBuckets(InvalidRequest):
    """A time series asked for more buckets than one answer holds."""
