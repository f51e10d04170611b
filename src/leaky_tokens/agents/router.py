"""HTTP routes of the agent API, at exactly the spec's paths; every answer is an envelope."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import Field, StringConstraints
from starlette.responses import Response

from leaky_tokens.agents.envelope import ok, paged
from leaky_tokens.agents.service import AgentService
from leaky_tokens.agents.upstreams import AgentError, forwarded_credentials
from leaky_tokens.shared.authn import authenticate
from leaky_tokens.shared.pagination import MAX_PAGE_SIZE
from leaky_tokens.shared.principal import Principal
from leaky_tokens.shared.schemas import RequestModel

router = APIRouter(prefix="/v1")


class SnakeModel(RequestModel):
    """The agent API's bodies are snake_case (the spec's field names); unknown fields are 400."""

    model_config = RequestModel.model_config | {"alias_generator": None}


Name = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=3, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$"
    ),
]


class RegisterBody(SnakeModel):
    name: Name
    email: (
        Annotated[
            str,
            StringConstraints(
                strip_whitespace=True, max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
            ),
        ]
        | None
    ) = None


class TokenBody(SnakeModel):
    api_key: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    api_secret: Annotated[str, StringConstraints(min_length=1, max_length=200)]


class SessionBody(SnakeModel):
    product_no: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)
    ]
    token_budget: int = Field(ge=1)
    lifetime_seconds: int | None = Field(None, ge=1)


class EventBody(SnakeModel):
    type: Literal["success", "http_error"]
    status_code: int | None = Field(None, ge=100, le=599)
    latency_ms: int | None = Field(None, ge=0, le=3_600_000)
    error_kind: Annotated[str, StringConstraints(max_length=32)] | None = None
    message: Annotated[str, StringConstraints(max_length=500)] | None = None


class RotateBody(SnakeModel):
    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]


class RechargeBody(SnakeModel):
    provider: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=32)]
    tokens: int = Field(ge=1)


def _service(request: Request) -> AgentService:
    service: AgentService = request.app.state.agent_service
    return service


async def agent_principal(request: Request) -> Principal:
    """The caller (X-API-Key or Bearer). A session credential only spends through its proxy."""
    principal = await authenticate(request)
    if principal.session_id is not None:
        raise AgentError(
            403,
            "FORBIDDEN",
            "a session credential is for the session's proxy (proxy.full_url) only",
        )
    return principal


Caller = Annotated[Principal, Depends(agent_principal)]
PageNo = Annotated[int, Query(ge=1, le=1_000_000)]
PageSize = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)]


def _creds(request: Request) -> dict[str, str]:
    return forwarded_credentials(request.headers)


def _check_limits(service: AgentService, body: SessionBody) -> None:
    limits = service.agents
    if body.token_budget > limits.max_token_budget:
        message = f"token_budget may be at most {limits.max_token_budget}"
        raise AgentError(
            400, "INVALID_REQUEST", message, details=[{"field": "token_budget", "message": message}]
        )
    if body.lifetime_seconds is not None and body.lifetime_seconds > limits.max_lifetime_seconds:
        message = f"lifetime_seconds may be at most {limits.max_lifetime_seconds}"
        raise AgentError(
            400,
            "INVALID_REQUEST",
            message,
            details=[{"field": "lifetime_seconds", "message": message}],
        )


@router.get("/health")
async def health(request: Request) -> Response:
    return ok(_service(request).health())


@router.post("/account/register")
async def register(body: RegisterBody, request: Request) -> Response:
    return ok(await _service(request).register(body.name, body.email), status=201)


@router.post("/auth/token")
async def issue_token(body: TokenBody, request: Request) -> Response:
    return ok(await _service(request).issue_token(body.api_key, body.api_secret))


@router.get("/account/info")
async def account_info(request: Request, _: Caller) -> Response:
    return ok(await _service(request).account_info(_creds(request)))


@router.get("/products")
async def list_products(
    request: Request, _: Caller, page: PageNo = 1, page_size: PageSize = 20
) -> Response:
    everything = _service(request).products()
    start = (page - 1) * page_size
    total = len(everything)
    return paged(
        everything[start : start + page_size],
        {
            "page": page,
            "page_size": page_size,
            "total": total,
            "total_pages": -(-total // page_size) if total else 0,
        },
    )


@router.get("/billing/balance")
async def balance(
    request: Request, _: Caller, page: PageNo = 1, page_size: PageSize = 20
) -> Response:
    items, pagination = await _service(request).balance(_creds(request), page, page_size)
    return paged(items, pagination)


@router.post("/billing/recharge")
async def recharge(
    body: RechargeBody,
    request: Request,
    principal: Caller,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Response:
    data = await _service(request).recharge(
        _creds(request), principal, idempotency_key, body.model_dump()
    )
    return ok(data, status=202)


@router.get("/billing/recharge/{order_id}/status")
async def recharge_status(order_id: str, request: Request, _: Caller) -> Response:
    try:
        uuid.UUID(order_id)
    except ValueError:
        raise AgentError(404, "ORDER_NOT_FOUND", "recharge order not found") from None
    return ok(await _service(request).recharge_status(_creds(request), order_id))


@router.post("/sessions")
async def create_session(
    body: SessionBody,
    request: Request,
    _: Caller,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Response:
    service = _service(request)
    _check_limits(service, body)
    data, created = await service.create_session(
        _creds(request), idempotency_key, body.model_dump()
    )
    return ok(data, status=201 if created else 200)


@router.get("/sessions")
async def list_sessions(
    request: Request,
    _: Caller,
    page: PageNo = 1,
    page_size: PageSize = 20,
    status: Annotated[
        Literal["pending", "active", "terminated", "expired", "failed"] | None, Query()
    ] = None,
) -> Response:
    items, pagination = await _service(request).list_sessions(
        _creds(request), page, page_size, status
    )
    return paged(items, pagination)


@router.get("/sessions/{session_id}")
async def get_session(session_id: str, request: Request, _: Caller) -> Response:
    return ok(await _service(request).get_session(_creds(request), _session_id(session_id)))


@router.post("/sessions/{session_id}/report-event")
async def report_event(session_id: str, body: EventBody, request: Request, _: Caller) -> Response:
    data = await _service(request).report_event(
        _creds(request), _session_id(session_id), body.model_dump()
    )
    return ok(data, status=201)


@router.get("/sessions/{session_id}/health")
async def session_health(session_id: str, request: Request, _: Caller) -> Response:
    return ok(await _service(request).session_health(_creds(request), _session_id(session_id)))


@router.post("/sessions/{session_id}/rotate")
async def rotate_session(
    session_id: str, body: RotateBody, request: Request, _: Caller
) -> Response:
    return ok(
        await _service(request).rotate_session(
            _creds(request), _session_id(session_id), body.reason
        )
    )


@router.post("/sessions/{session_id}/terminate")
async def terminate_session(session_id: str, request: Request, _: Caller) -> Response:
    return ok(await _service(request).terminate_session(_creds(request), _session_id(session_id)))


@router.get("/stats/overview")
async def stats_overview(request: Request, _: Caller) -> Response:
    return ok(await _service(request).stats_overview(_creds(request)))


def _session_id(raw: str) -> uuid.UUID:
    """A path id that is not a session id names no session: 404, like an unknown one."""
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise AgentError(404, "SESSION_NOT_FOUND", "session not found") from None
