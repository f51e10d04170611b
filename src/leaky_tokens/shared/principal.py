"""Who is calling: the identity every service authorises against."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal

ADMIN = "ADMIN"
USER = "USER"


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: uuid.UUID
    roles: frozenset[str]
    org_ids: frozenset[uuid.UUID] = field(default_factory=frozenset)
    method: Literal["jwt", "api_key"] = "jwt"
    api_key_id: uuid.UUID | None = None
    username: str | None = None
    # An API key made for an organisation: its /v1 calls charge that org's pool.
    key_org_id: uuid.UUID | None = None
    # An agent session's credential (issue 13): spending is charged to that session's budget.
    session_id: uuid.UUID | None = None
    # The auth service's principal-change feed cursor when this credential was issued (a JWT's
    # `fseq` claim, an API-key answer's `feedSeq`): a later change about the user or one of
    # their organisations makes it stale (shared/principal_feed.py).
    issued_seq: int | None = None

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.roles

    def may_act_for_user(self, user_id: uuid.UUID) -> bool:
        return self.is_admin or self.user_id == user_id

    def may_act_for_org(self, org_id: uuid.UUID) -> bool:
        return self.is_admin or org_id in self.org_ids
