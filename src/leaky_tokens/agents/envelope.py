"""The agent API's envelope: every answer is {success, data, error, meta{request_id, timestamp}};
lists put `items` and `pagination` in `data`. Errors carry the agent API's code table."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from leaky_tokens.agents.upstreams import AgentError
from leaky_tokens.shared.clock import SystemClock, utc_iso
from leaky_tokens.shared.errors import AppError
from leaky_tokens.shared.http import describe_validation_errors
from leaky_tokens.shared.request_context import current_request_id

log = logging.getLogger("leaky_tokens.agents")
_clock = SystemClock()

# The code table (README, "Agent API"): the services' own codes folded into the ones the agent
# spec names, so an agent has one short list to handle.
CODE_TABLE: dict[str, str] = {
    "AUTH_REQUIRED": "AUTH_INVALID_KEY",
    "AUTH_INVALID_KEY": "AUTH_INVALID_KEY",
    "AUTH_REVOKED_KEY": "AUTH_INVALID_KEY",
    "AUTH_INVALID_TOKEN": "AUTH_INVALID_KEY",
    "AUTH_EXPIRED_KEY": "AUTH_EXPIRED_TOKEN",
    "AUTH_EXPIRED_TOKEN": "AUTH_EXPIRED_TOKEN",
    "AUTH_INVALID_CREDENTIALS": "AUTH_INVALID_KEY",
    "LOGIN_THROTTLED": "RATE_LIMITED",
    "INSUFFICIENT_QUOTA": "INSUFFICIENT_BALANCE",
    "SAGA_NOT_FOUND": "ORDER_NOT_FOUND",
    "QUOTA_NOT_FOUND": "NOT_FOUND",
    "WEAK_PASSWORD": "INVALID_REQUEST",
    "TOKENS_EXCEED_CAPACITY": "INVALID_REQUEST",
}


def agent_code(code: str) -> str:
    return CODE_TABLE.get(code, code)


def meta() -> dict[str, str]:
    return {"request_id": current_request_id() or "", "timestamp": utc_iso(_clock.now())}


def _json(body: Any, status: int, headers: Mapping[str, str] | None) -> Response:
    return Response(
        orjson.dumps(body),
        status_code=status,
        media_type="application/json",
        headers=dict(headers) if headers else None,
    )


def ok(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return _json({"success": True, "data": data, "error": None, "meta": meta()}, status, headers)


def paged(items: list[Any], pagination: Mapping[str, Any]) -> Response:
    return ok({"items": items, "pagination": dict(pagination)})


def fail(
    status: int,
    code: str,
    message: str,
    *,
    details: Sequence[Mapping[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    error: dict[str, Any] = {"code": agent_code(code), "message": message}
    if details:
        error["details"] = list(details)
    return _json({"success": False, "data": None, "error": error, "meta": meta()}, status, headers)


async def _app_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, AppError)
    return fail(exc.status, exc.code, exc.message, details=exc.details, headers=exc.headers)


async def _agent_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, AgentError)
    return fail(exc.status, exc.code, exc.message, details=exc.details, headers=exc.headers)


async def _validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    message, details = describe_validation_errors(exc.errors())
    return fail(400, "INVALID_REQUEST", message, details=details)


_HTTP = {
    400: ("INVALID_REQUEST", "invalid request"),
    404: ("NOT_FOUND", "no such endpoint"),
    405: ("METHOD_NOT_ALLOWED", "method not allowed"),
    413: ("PAYLOAD_TOO_LARGE", "request body too large"),
}


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code, message = _HTTP.get(exc.status_code, ("HTTP_ERROR", "request failed"))
    if exc.status_code == 400 and exc.detail:
        message = str(exc.detail)
    return fail(exc.status_code, code, message, headers=exc.headers)


async def _unexpected(_: Request, exc: Exception) -> Response:
    log.error("unhandled error in the agent API", exc_info=exc)
    return fail(500, "INTERNAL_ERROR", "internal server error")


def install_envelope_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(AgentError, _agent_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
