"""The error hierarchy every service raises, and the one place errors become HTTP bodies.

Body (DESIGN.md): {"message", "timestamp", "code", "requestId"} plus optional "details".

A service that cannot serve anyone right now (its database, Redis or the auth service is down)
says so with `X-Service-Outage: true` on its 503 (`AppError.outage`); a 503 about one caller's
request (purchases switched off) does not. The gateway's breakers count only the former.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

OUTAGE_HEADER = "X-Service-Outage"


class AppError(Exception):
    """A domain error that knows its HTTP status and machine-readable code."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "INVALID_REQUEST"
    default_message: ClassVar[str] = "invalid request"
    # True: the service itself is unavailable (answers carry OUTAGE_HEADER).
    outage: ClassVar[bool] = False
    # On the OpenAI face (/v1, shared/http.py `face_of`): the error's `type` and `code` there;
    # None derives them from `status` and `code`.
    openai_type: ClassVar[str | None] = None
    openai_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str | None = None,
        *,
        details: Sequence[Mapping[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.details = list(details) if details else None
        self.headers = dict(headers) if headers else {}
        self.extra = dict(extra) if extra else {}
        if self.outage:
            self.headers[OUTAGE_HEADER] = "true"
        super().__init__(self.message)


class InvalidRequest(AppError):
    status = 400
    code = "INVALID_REQUEST"
    default_message = "invalid request"


class Unauthenticated(AppError):
    status = 401
    code = "AUTH_REQUIRED"
    default_message = "authentication required"


class InvalidToken(Unauthenticated):
    code = "AUTH_INVALID_TOKEN"
    default_message = "invalid bearer token"


class RevokedToken(Unauthenticated):
    code = "AUTH_REVOKED_TOKEN"
    default_message = (
        "this session was revoked (its account, memberships or roles changed); log in again"
    )


class ExpiredToken(Unauthenticated):
    code = "AUTH_EXPIRED_TOKEN"
    default_message = "bearer token has expired"


class InvalidApiKey(Unauthenticated):
    code = "AUTH_INVALID_KEY"
    default_message = "invalid API key"


class RevokedApiKey(Unauthenticated):
    code = "AUTH_REVOKED_KEY"
    default_message = "API key has been revoked"


class ExpiredApiKey(Unauthenticated):
    code = "AUTH_EXPIRED_KEY"
    default_message = "API key has expired"


class Forbidden(AppError):
    status = 403
    code = "FORBIDDEN"
    default_message = "not allowed"


class NotFound(AppError):
    status = 404
    code = "NOT_FOUND"
    default_message = "not found"


class MethodNotAllowed(AppError):
    status = 405
    code = "METHOD_NOT_ALLOWED"
    default_message = "method not allowed"


class Conflict(AppError):
    status = 409
    code = "CONFLICT"
    default_message = "conflict"


class PayloadTooLarge(AppError):
    status = 413
    code = "PAYLOAD_TOO_LARGE"
    default_message = "request body too large"


class TooManyRequests(AppError):
    status = 429
    code = "RATE_LIMITED"
    default_message = "too many requests"


class ServiceUnavailable(AppError):
    """The service cannot serve anyone now (a dependency is down): an outage."""

    status = 503
    code = "SERVICE_UNAVAILABLE"
    default_message = "service unavailable"
    outage = True


class InternalError(AppError):
    status = 500
    code = "INTERNAL_ERROR"
    default_message = "internal server error"
