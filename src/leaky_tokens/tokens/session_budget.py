"""Which pool a call is charged to (issue 13): a session credential's calls spend its session's
budget, which lives in a pool of its own. The one place that decides it, for /consume and /v1."""

from __future__ import annotations

import uuid

from leaky_tokens.shared.principal import Principal

USER_POOL = "user"
ORG_POOL = "org"
# A session's budget: owner_kind "session", owner_id the session's id, and this provider (the
# budget is in tokens, whichever provider the session's model is on at the moment).
SESSION_POOL = "session"
SESSION_POOL_PROVIDER = "session"


def charge_target(
    principal: Principal, org_id: uuid.UUID | None, user_id: uuid.UUID, provider: str
) -> tuple[str, uuid.UUID, str]:
    """(owner kind, owner id, pool provider): the session's pool for a session credential,
    else the org's pool when one is named, else the user's."""
    if principal.session_id is not None:
        return SESSION_POOL, principal.session_id, SESSION_POOL_PROVIDER
    if org_id is not None:
        return ORG_POOL, org_id, provider
    return USER_POOL, user_id, provider
