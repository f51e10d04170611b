"""The HTTP envelope every service shares: request ids, security headers, access logs, metrics,
body-size limits and the one error handler that renders DESIGN.md's error body.

An error's body depends on the API face its path belongs to (`face_of`): the plan's
`{message, timestamp, code, requestId}` everywhere, except the OpenAI-compatible paths, where
it is OpenAI's `{"error": {message, type, param, code}}` (the official SDKs read it and pick
their exception class by status). Services that serve a face other than the plan's (the gateway
and the token service) build their envelope with `faces=face_of`; the stubs do not (their
emulated APIs render their providers' own bodies).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, Literal

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from leaky_tokens.shared.clock import Clock, SystemClock, utc_iso
from leaky_tokens.shared.errors import AppError
from leaky_tokens.shared.request_context import current_request_id, new_request_id, set_request_id

access_log = logging.getLogger("leaky_tokens.access")
error_log = logging.getLogger("leaky_tokens.error")
# The answering app's clock (EnvelopeMiddleware sets it per request), so error timestamps follow
# an injected clock as everything else does.
_clock: ContextVar[Clock | None] = ContextVar("leaky_tokens_clock", default=None)
_SYSTEM_CLOCK = SystemClock()  # outside any request (no app has said which clock it runs on)

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)
MAX_BODY_BYTES = 1024 * 1024

Face = Literal["plan", "openai", "agent"]
# Under /v1 the OpenAI API (chat/completions, models, responses, embeddings, and any unknown
# path, answered as OpenAI would) — except the agent API's paths (DESIGN.md "Three faces",
# issue 13), which keep their own envelope.
AGENT_PREFIXES: tuple[str, ...] = (
    "/v1/health",
    "/v1/account",
    "/v1/auth/",
    "/v1/products",
    "/v1/billing",
    "/v1/sessions",
    "/v1/stats",
)
_face: ContextVar[Face] = ContextVar("api_face", default="plan")


def face_of(path: str) -> Face:
    """The API face a path belongs to, which decides the shape of its error bodies."""
    if path == "/v1" or path.startswith("/v1/"):
        return "agent" if path.startswith(AGENT_PREFIXES) else "openai"
    return "plan"


# The agent API's code table (README, "Agent API"): the services' own codes folded into the ones
# the agent spec names, so an agent has one short list to handle.
AGENT_CODES: dict[str, str] = {
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
    "VALIDATION_ERROR": "INVALID_REQUEST",
}


def agent_code(code: str) -> str:
    return AGENT_CODES.get(code, code)


def agent_meta() -> dict[str, str]:
    return {
        "request_id": current_request_id() or "",
        "timestamp": utc_iso((_clock.get() or _SYSTEM_CLOCK).now()),
    }


def agent_error_body(
    code: str, message: str, details: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """The agent API's envelope around an error (issue 13)."""
    error: dict[str, Any] = {"code": agent_code(code), "message": message}
    if details:
        error["details"] = list(details)
    return {"success": False, "data": None, "error": error, "meta": agent_meta()}


def current_face() -> Face:
    return _face.get()


def go_duration(seconds: float) -> str:
    """A duration as OpenAI writes it in `x-ratelimit-reset-*`: "84ms", "1s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = int(seconds + 0.999)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class _BodyTooLarge(Exception):
    pass


def error_body(
    status: int,
    code: str,
    message: str,
    details: Sequence[Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "message": message,
        "timestamp": utc_iso((_clock.get() or _SYSTEM_CLOCK).now()),
        "code": code,
        "requestId": current_request_id(),
    }
    if details:
        body["details"] = list(details)
    if extra:
        body.update(extra)
    return body


# Our codes -> OpenAI's (type, code) where OpenAI has a name for the condition.
_OPENAI_ERRORS: dict[str, tuple[str, str | None]] = {
    "AUTH_REQUIRED": ("invalid_request_error", "invalid_api_key"),
    "AUTH_INVALID_KEY": ("invalid_request_error", "invalid_api_key"),
    "AUTH_REVOKED_KEY": ("invalid_request_error", "invalid_api_key"),
    "AUTH_EXPIRED_KEY": ("invalid_request_error", "invalid_api_key"),
    "AUTH_INVALID_TOKEN": ("invalid_request_error", "invalid_api_key"),
    "AUTH_EXPIRED_TOKEN": ("invalid_request_error", "invalid_api_key"),
    "RATE_LIMITED": ("requests", "rate_limit_exceeded"),
    "INSUFFICIENT_QUOTA": ("insufficient_quota", "insufficient_quota"),
    "FORBIDDEN": ("invalid_request_error", "permission_denied"),
    "NOT_FOUND": ("invalid_request_error", "not_found"),
    "METHOD_NOT_ALLOWED": ("invalid_request_error", "method_not_allowed"),
    "INVALID_REQUEST": ("invalid_request_error", None),
    "INTERNAL_ERROR": ("server_error", None),
}


def openai_error_body(
    status: int,
    code: str,
    message: str,
    details: Sequence[Mapping[str, Any]] | None = None,
    *,
    openai_type: str | None = None,
    openai_code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error body: `param` names the first field at fault, if any."""
    kind, mapped = _OPENAI_ERRORS.get(
        code, ("server_error" if status >= 500 else "invalid_request_error", code.lower())
    )
    param = None
    for detail in details or ():
        field = detail.get("field")
        if isinstance(field, str) and field != "body":
            param = field
            break
    return {
        "error": {
            "message": message,
            "type": openai_type or kind,
            "param": param,
            "code": openai_code or mapped,
        }
    }


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    details: Sequence[Mapping[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
    openai_type: str | None = None,
    openai_code: str | None = None,
) -> Response:
    """The error answer in the face of the request being served (`face_of` its path)."""
    if _face.get() == "openai":
        body = openai_error_body(
            status, code, message, details, openai_type=openai_type, openai_code=openai_code
        )
        answer_headers = dict(headers) if headers else {}
        retry_after = answer_headers.get("Retry-After") or answer_headers.get("retry-after")
        if status == 429 and retry_after and retry_after.isdigit():
            answer_headers.setdefault("retry-after-ms", str(int(retry_after) * 1000))
        if body["error"]["type"] == "insufficient_quota":
            # Not transient: the SDKs would otherwise retry it (twice, by default).
            answer_headers["x-should-retry"] = "false"
        return Response(
            orjson.dumps(body),
            status_code=status,
            media_type="application/json",
            headers=answer_headers or None,
        )
    if _face.get() == "agent":
        return Response(
            orjson.dumps(agent_error_body(code, message, details)),
            status_code=status,
            media_type="application/json",
            headers=dict(headers) if headers else None,
        )
    return Response(
        orjson.dumps(error_body(status, code, message, details, extra)),
        status_code=status,
        media_type="application/json",
        headers=dict(headers) if headers else None,
    )


def _field_name(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "cookie")]
    return ".".join(parts) if parts else str(loc[0]) if loc else "request"


def describe_validation_errors(
    errors: Sequence[Mapping[str, Any]],
) -> tuple[str, list[dict[str, str]]]:
    """Turn pydantic errors into one readable message and a per-field list."""
    details: list[dict[str, str]] = []
    for err in errors:
        kind = err.get("type", "")
        loc = err.get("loc", ())
        if kind == "json_invalid":
            return "malformed JSON body", [{"field": "body", "message": "malformed JSON body"}]
        field = _field_name(loc)
        if tuple(loc) == ("body",) and kind in ("missing", "dict_type", "model_attributes_type"):
            message = "request body must be a JSON object sent with Content-Type: application/json"
            return message, [{"field": "body", "message": message}]
        if kind == "missing":
            where = loc[0] if loc else "body"
            noun = {"query": "query parameter", "header": "header"}.get(str(where), "field")
            msg = f"missing required {noun}"
        else:
            msg = str(err.get("msg", "invalid value"))
        details.append({"field": field, "message": msg})
    missing = [d["field"] for d in details if d["message"].startswith("missing required")]
    others = [f"{d['field']}: {d['message']}" for d in details if d["field"] not in missing]
    parts = []
    if missing:
        parts.append("missing required " + ", ".join(missing))
    parts.extend(others)
    return "; ".join(parts) or "invalid request", details


async def _app_error_handler(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, AppError)
    return error_response(
        exc.status,
        exc.code,
        exc.message,
        details=exc.details,
        headers=exc.headers,
        extra=exc.extra,
        openai_type=exc.openai_type,
        openai_code=exc.openai_code,
    )


async def _validation_handler(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    message, details = describe_validation_errors(exc.errors())
    return error_response(400, "INVALID_REQUEST", message, details=details)


_HTTP_CODES = {
    400: ("INVALID_REQUEST", "invalid request"),
    404: ("NOT_FOUND", "no such resource"),
    405: ("METHOD_NOT_ALLOWED", "method not allowed"),
    413: ("PAYLOAD_TOO_LARGE", "request body too large"),
}


async def _http_exception_handler(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc.__cause__, _BodyTooLarge):
        # FastAPI turns any failure while reading a body into a 400; a streamed body cut off by
        # our size limit (no Content-Length to refuse it up front) is still a 413.
        return error_response(413, "PAYLOAD_TOO_LARGE", "request body too large")
    code, message = _HTTP_CODES.get(exc.status_code, ("HTTP_ERROR", "request failed"))
    if exc.status_code == 400 and exc.detail:
        message = str(exc.detail)
    headers = dict(exc.headers) if exc.headers else None
    return error_response(exc.status_code, code, message, headers=headers)


# PostgreSQL's refusals of text it cannot hold (NUL in text or JSON): 22021
# character_not_in_repertoire, 22P05 untranslatable_character.
_REFUSED_TEXT_SQLSTATES = frozenset({"22021", "22P05"})


def _text_the_database_refused(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):  # the driver's error, wrapped by SQLAlchemy's adapter and DBAPIError
        if seen is None:
            return False
        for candidate in (seen, getattr(seen, "orig", None)):
            if getattr(candidate, "sqlstate", None) in _REFUSED_TEXT_SQLSTATES:
                return True
        seen = seen.__cause__ or seen.__context__
    return False


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)


class HttpMetrics:
    """Per-service Prometheus registry (several services may share one process)."""

    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests",
            "HTTP requests answered",
            ["service", "method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time to answer an HTTP request",
            ["service", "method", "route"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.service = service


class EnvelopeMiddleware:
    """Outermost layer of every service: request id, security headers, body limit, metrics,
    access log, and a 500 in our error shape for anything unexpected."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        service: str,
        metrics: HttpMetrics,
        log_access: bool = True,
        max_body_bytes: int = MAX_BODY_BYTES,
        clock: Clock | None = None,
        faces: Callable[[str], Face] | None = None,
    ) -> None:
        self.app = app
        self.clock = clock or SystemClock()
        self.faces = faces
        self.service = service
        self.metrics = metrics
        self.log_access = log_access
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        offered: str | None = None
        content_length = -1
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                offered = value.decode("latin-1")
            elif name == b"content-length":
                try:
                    content_length = int(value)
                except ValueError:
                    content_length = -1
        request_id = new_request_id(offered)
        set_request_id(request_id)
        _clock.set(self.clock)
        _face.set(self.faces(scope["path"]) if self.faces is not None else "plan")
        rid_header = (b"x-request-id", request_id.encode("latin-1"))
        status_holder = [500]
        response_started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                status_holder[0] = message["status"]
                headers = list(message.get("headers", []))
                headers.append(rid_header)
                headers.extend(SECURITY_HEADERS)
                message = {**message, "headers": headers}
            await send(message)

        received = 0
        max_body = self.max_body_bytes

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body:
                    raise _BodyTooLarge
            return message

        try:
            if content_length > max_body:
                raise _BodyTooLarge
            await self.app(scope, receive_limited, send_wrapper)
        except _BodyTooLarge:
            if not response_started:
                # Closing the connection is what stops the rest of the body from being read
                # (and discarded) by the server: a refused body is never drained.
                await error_response(
                    413,
                    "PAYLOAD_TOO_LARGE",
                    "request body too large",
                    headers={"Connection": "close"},
                )(scope, receive, send_wrapper)
        except Exception as exc:
            if _text_the_database_refused(exc):
                # The transaction failed whole, so nothing was written: the caller's text is
                # at fault, not the service.
                if not response_started:
                    await error_response(
                        400,
                        "INVALID_REQUEST",
                        "text in the request holds a character that cannot be stored (NUL)",
                    )(scope, receive, send_wrapper)
                return
            error_log.exception("unhandled error", extra={"service": self.service})
            if not response_started:
                await error_response(500, "INTERNAL_ERROR", "internal server error")(
                    scope, receive, send_wrapper
                )
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            route_path = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            status = status_holder[0]
            self.metrics.requests.labels(self.service, method, route_path, str(status)).inc()
            self.metrics.latency.labels(self.service, method, route_path).observe(elapsed)
            if self.log_access:
                access_log.info(
                    "request",
                    extra={
                        "service": self.service,
                        "method": method,
                        "path": scope["path"],
                        "status": status,
                        "durationMs": round(elapsed * 1000, 3),
                        "client": (scope.get("client") or ("", 0))[0],
                    },
                )
            set_request_id(None)
            _face.set("plan")
