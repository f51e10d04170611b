"""Request and response bodies of the auth service."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from leaky_tokens.shared.schemas import ApiModel, RequestModel, UtcInput

Username = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=3, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$"
    ),
]
Email = Annotated[
    str,
    StringConstraints(strip_whitespace=True, max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$"),
]
Password = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]


class RegisterRequest(RequestModel):
    username: Username
    email: Email
    password: Password


class LoginRequest(RequestModel):
    username: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
    password: Password


class SessionRead(ApiModel):
    user_id: uuid.UUID
    username: str
    token: str
    roles: list[str]
    token_type: Literal["Bearer"] = "Bearer"
    expires_in: int


class ApiKeyCreate(RequestModel):
    user_id: uuid.UUID | None = Field(None, description="Owner; defaults to the caller")
    name: Name
    expires_at: UtcInput | None = None
    org_id: uuid.UUID | None = Field(
        None, description="An organisation the owner belongs to: the key's calls charge its pool"
    )
    session_id: uuid.UUID | None = Field(
        None, description="An agent session's credential: spending is charged to its budget"
    )


class ApiKeyCreated(ApiModel):
    id: uuid.UUID
    user_id: uuid.UUID
    name: str
    raw_key: str = Field(description="Shown once; only a hash is stored")
    created_at: datetime
    expires_at: datetime | None
    org_id: uuid.UUID | None = None
    session_id: uuid.UUID | None = None


class ApiKeyRead(ApiModel):
    id: uuid.UUID
    user_id: uuid.UUID
    name: str
    key_preview: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    status: Literal["active", "revoked", "expired"]
    org_id: uuid.UUID | None = None


class ApiKeyValidation(ApiModel):
    user_id: uuid.UUID
    username: str
    name: str
    expires_at: datetime | None
    roles: list[str]
    api_key_id: uuid.UUID
    org_ids: list[uuid.UUID]
    org_id: uuid.UUID | None = Field(None, description="The organisation the key charges")
    session_id: uuid.UUID | None = None
    # The principal-change feed's cursor when this answer was read (a cached answer older than
    # a change about its user or orgs is asked again).
    feed_seq: int = 0


class RolesUpdate(RequestModel):
    roles: list[str] = Field(min_length=1, max_length=8)


class UserRolesRead(ApiModel):
    user_id: uuid.UUID
    username: str
    roles: list[str]


class OrgCreate(RequestModel):
    name: Name


class OrgRead(ApiModel):
    org_id: uuid.UUID
    name: str
    owner_id: uuid.UUID
    created_at: datetime
    role: str | None = None


class MemberAdd(RequestModel):
    user_id: uuid.UUID


class MemberRead(ApiModel):
    org_id: uuid.UUID
    user_id: uuid.UUID
    role: str
    created_at: datetime


class PrincipalRead(ApiModel):
    user_id: uuid.UUID
    username: str | None
    roles: list[str]
    org_ids: list[uuid.UUID]
    method: str


class KeyRotated(ApiModel):
    kid: str
