"""HTTP routes of the auth service (plan §1.1-1.4, organisations, JWKS)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response, status

from leaky_tokens.auth.models import ApiKey, Organization
from leaky_tokens.auth.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyRead,
    ApiKeyValidation,
    KeyRotated,
    LoginRequest,
    MemberAdd,
    MemberRead,
    OrgCreate,
    OrgRead,
    PrincipalRead,
    RegisterRequest,
    RolesUpdate,
    SessionRead,
    UserRolesRead,
)
from leaky_tokens.auth.service import AuthService
from leaky_tokens.shared.authn import CurrentPrincipal
from leaky_tokens.shared.client_ip import TrustedProxies
from leaky_tokens.shared.errors import InvalidApiKey, ServiceUnavailable
from leaky_tokens.shared.events import INTERNAL_TOKEN_HEADER, check_internal_token
from leaky_tokens.shared.pagination import Page, PageParams, page_of
from leaky_tokens.shared.schemas import HealthRead

router = APIRouter()
PREFIX = "/api/v1/auth"


def _service(request: Request) -> AuthService:
    service: AuthService = request.app.state.auth_service
    return service


def _client(request: Request) -> str:
    """The caller's address as the edge established it (trusted proxies only)."""
    proxies: TrustedProxies = request.app.state.trusted_proxies
    return proxies.client_ip(request)


def _session_body(
    service: AuthService, user_id: uuid.UUID, username: str, token: str, roles: list[str]
) -> SessionRead:
    return SessionRead(
        user_id=user_id,
        username=username,
        token=token,
        roles=roles,
        expires_in=service.settings.jwt_ttl_seconds,
    )


@router.get(f"{PREFIX}/health", tags=["health"])
async def health(request: Request) -> HealthRead:
    if not await _service(request).db.ping():
        raise ServiceUnavailable("auth database unavailable")
    return HealthRead(service="auth", status="UP", checks={"database": "UP"})


@router.post(f"{PREFIX}/register", status_code=status.HTTP_201_CREATED, tags=["accounts"])
async def register(body: RegisterRequest, request: Request) -> SessionRead:
    service = _service(request)
    issued = await service.register(body.username, body.email, body.password, _client(request))
    user = issued.user
    return _session_body(service, user.id, user.username, issued.token, list(user.roles))


@router.post(f"{PREFIX}/login", tags=["accounts"])
async def login(body: LoginRequest, request: Request) -> SessionRead:
    service = _service(request)
    issued = await service.login(body.username, body.password, _client(request))
    user = issued.user
    return _session_body(service, user.id, user.username, issued.token, list(user.roles))


@router.get(f"{PREFIX}/me", tags=["accounts"])
async def me(principal: CurrentPrincipal) -> PrincipalRead:
    return PrincipalRead(
        user_id=principal.user_id,
        username=principal.username,
        roles=sorted(principal.roles),
        org_ids=sorted(principal.org_ids),
        method=principal.method,
    )


@router.get("/oauth2/jwks", tags=["keys"])
@router.get(f"{PREFIX}/jwks", tags=["keys"])
async def jwks(request: Request) -> dict[str, Any]:
    return _service(request).keys.jwks()


@router.post(f"{PREFIX}/admin/signing-keys/rotate", tags=["keys"])
async def rotate_signing_key(request: Request, principal: CurrentPrincipal) -> KeyRotated:
    return KeyRotated(kid=await _service(request).rotate_signing_key_for(principal))


def _key_read(key: ApiKey, service: AuthService) -> ApiKeyRead:
    state: Literal["active", "revoked", "expired"]
    if key.revoked_at is not None:
        state = "revoked"
    elif key.expires_at is not None and key.expires_at <= service.clock.now():
        state = "expired"
    else:
        state = "active"
    return ApiKeyRead(
        id=key.id,
        user_id=key.user_id,
        name=key.name,
        key_preview=key.key_prefix,
        org_id=key.org_id,
        created_at=key.created_at,
        expires_at=key.expires_at,
        revoked_at=key.revoked_at,
        status=state,
    )


@router.post(f"{PREFIX}/api-keys", status_code=status.HTTP_201_CREATED, tags=["api keys"])
async def create_api_key(
    body: ApiKeyCreate, request: Request, principal: CurrentPrincipal
) -> ApiKeyCreated:
    owner = body.user_id or principal.user_id
    key, raw = await _service(request).create_api_key(
        principal,
        owner,
        body.name,
        body.expires_at,
        org_id=body.org_id,
        session_id=body.session_id,
    )
    return ApiKeyCreated(
        id=key.id,
        user_id=key.user_id,
        name=key.name,
        raw_key=raw,
        created_at=key.created_at,
        expires_at=key.expires_at,
        org_id=key.org_id,
        session_id=key.session_id,
    )


@router.get(f"{PREFIX}/api-keys", tags=["api keys"])
async def list_api_keys(
    request: Request,
    principal: CurrentPrincipal,
    page: PageParams,
    user_id: Annotated[uuid.UUID | None, Query(alias="userId")] = None,
) -> Page[ApiKeyRead]:
    service = _service(request)
    keys, total = await service.list_api_keys(principal, user_id or principal.user_id, page)
    return Page[ApiKeyRead].model_validate(
        page_of([_key_read(k, service) for k in keys], page, total)
    )


@router.get(f"{PREFIX}/api-keys/validate", tags=["api keys"])
async def validate_api_key(
    request: Request, x_api_key: Annotated[str | None, Header()] = None
) -> ApiKeyValidation:
    if not x_api_key or not x_api_key.strip():
        raise InvalidApiKey("missing X-Api-Key header")
    found = await _service(request).validate_api_key(x_api_key.strip())
    return ApiKeyValidation(
        user_id=found.user.id,
        username=found.user.username,
        name=found.key.name,
        expires_at=found.key.expires_at,
        roles=list(found.user.roles),
        api_key_id=found.key.id,
        org_ids=found.org_ids,
        org_id=found.key.org_id,
        session_id=found.key.session_id,
        feed_seq=found.feed_seq,
    )


@router.get(f"{PREFIX}/api-keys/revocations", tags=["internal"])
async def api_key_revocations(
    request: Request,
    after: Annotated[int | None, Query(ge=0)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
    wait: Annotated[float, Query(ge=0, le=10)] = 0,
) -> dict[str, Any]:
    """The feed other services follow: API keys revoked and principals changed (`changes`:
    `kind` user / membership / role / org, with the user or organisation) after cursor `after`;
    without it, the current cursor and the principal changes recent enough to matter. With
    `wait`, an empty answer waits up to that many seconds for news (long poll). Internal: it
    needs the internal token (X-Internal-Token), and the gateway does not route it."""
    check_internal_token(
        request.app.state.internal_token.encode(), request.headers.get(INTERNAL_TOKEN_HEADER)
    )
    page = await _service(request).feed_after(
        after, limit, wait_seconds=wait, gone=request.is_disconnected
    )
    return {
        "cursor": page.cursor,
        "revokedKeyIds": [str(c.api_key_id) for c in page.changes if c.kind == "api_key"],
        "changes": [c.to_wire() for c in page.changes],
        "hasMore": page.more,
    }


@router.delete(f"{PREFIX}/api-keys", status_code=status.HTTP_204_NO_CONTENT, tags=["api keys"])
async def revoke_api_key(
    request: Request,
    principal: CurrentPrincipal,
    api_key_id: Annotated[uuid.UUID, Query(alias="apiKeyId")],
    user_id: Annotated[uuid.UUID | None, Query(alias="userId")] = None,
) -> Response:
    await _service(request).revoke_api_key(principal, user_id or principal.user_id, api_key_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.delete(
    f"{PREFIX}/api-keys/{{api_key_id}}", status_code=status.HTTP_204_NO_CONTENT, tags=["api keys"]
)
async def revoke_api_key_by_path(
    api_key_id: uuid.UUID,
    request: Request,
    principal: CurrentPrincipal,
    user_id: Annotated[uuid.UUID | None, Query(alias="userId")] = None,
) -> Response:
    await _service(request).revoke_api_key(principal, user_id or principal.user_id, api_key_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _org_read(org: Organization, role: str | None = None) -> OrgRead:
    return OrgRead(
        org_id=org.id, name=org.name, owner_id=org.owner_id, created_at=org.created_at, role=role
    )


@router.post(f"{PREFIX}/orgs", status_code=status.HTTP_201_CREATED, tags=["organisations"])
async def create_org(body: OrgCreate, request: Request, principal: CurrentPrincipal) -> OrgRead:
    org = await _service(request).create_org(principal, body.name)
    return _org_read(org, "OWNER")


@router.get(f"{PREFIX}/orgs", tags=["organisations"])
async def list_orgs(
    request: Request, principal: CurrentPrincipal, page: PageParams
) -> Page[OrgRead]:
    rows, total = await _service(request).list_orgs(principal, page)
    return Page[OrgRead].model_validate(
        page_of([_org_read(org, role) for org, role in rows], page, total)
    )


@router.post(
    f"{PREFIX}/orgs/{{org_id}}/members",
    status_code=status.HTTP_201_CREATED,
    tags=["organisations"],
)
async def add_member(
    org_id: uuid.UUID, body: MemberAdd, request: Request, principal: CurrentPrincipal
) -> MemberRead:
    member = await _service(request).add_member(principal, org_id, body.user_id)
    return MemberRead(
        org_id=member.org_id, user_id=member.user_id, role=member.role, created_at=member.created_at
    )


@router.post(
    f"{PREFIX}/orgs/{{org_id}}/revoke-tokens",
    status_code=status.HTTP_204_NO_CONTENT,
    tags=["organisations"],
)
async def revoke_org_tokens(
    org_id: uuid.UUID, request: Request, principal: CurrentPrincipal
) -> Response:
    """Every token naming the organisation, issued before now, stops working everywhere within
    a second (members log in again). Its owner or an ADMIN."""
    await _service(request).revoke_org_tokens(principal, org_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    f"{PREFIX}/users/{{user_id}}/revoke-tokens",
    status_code=status.HTTP_204_NO_CONTENT,
    tags=["accounts"],
)
async def revoke_user_tokens(
    user_id: uuid.UUID, request: Request, principal: CurrentPrincipal
) -> Response:
    """Every token of the user, issued before now, stops working everywhere within a second.
    The user themself or an ADMIN; API keys are revoked one by one."""
    await _service(request).revoke_user_sessions(principal, user_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.put(f"{PREFIX}/admin/users/{{user_id}}/roles", tags=["accounts"])
async def set_user_roles(
    user_id: uuid.UUID, body: RolesUpdate, request: Request, principal: CurrentPrincipal
) -> UserRolesRead:
    """ADMIN: set a user's roles; their tokens issued before stop working (they carry the old
    roles)."""
    user = await _service(request).set_roles(principal, user_id, body.roles)
    return UserRolesRead(user_id=user.id, username=user.username, roles=sorted(user.roles))


@router.delete(
    f"{PREFIX}/orgs/{{org_id}}/members/{{user_id}}",
    status_code=status.HTTP_204_NO_CONTENT,
    tags=["organisations"],
)
async def remove_member(
    org_id: uuid.UUID, user_id: uuid.UUID, request: Request, principal: CurrentPrincipal
) -> Response:
    await _service(request).remove_member(principal, org_id, user_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
