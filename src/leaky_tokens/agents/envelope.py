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
from leaky_tokens.shared.errors import AppError
from leaky_tokens.shared.http import agent_error_body, agent_meta, describe_validation_errors

log = logging.getLogger("leaky_tokens.agents")


def _json(body: Any, status: int, headers: Mapping[str, str] | None) -> Response:
    return Response(
        orjson.dumps(body),
        status_code=status,
        media_type="application/json",
        headers=dict(headers) if headers else None,
    )


def ok(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return _json(
        {"success": True, "data": data, "error": None, "meta": agent_meta()}, status, headers
    )


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
    return _json(agent_error_body(code, message, details), status, headers)


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
