"""Principal changes: who must present fresh credentials because their standing changed.

The auth service's feed (ARCHITECTURE.md, "Revocation is an event") carries, besides revoked
API keys, a change per user whose sessions were revoked, membership removed or roles changed,
and per organisation whose tokens were revoked as a whole. Every JWT and every API-key answer
carries the feed's cursor at the moment it was issued (`issued_seq`); a principal is stale when
a change about its user, or about one of its organisations, came later. So the check is a dict
lookup per request against state a follower keeps current, and needs no clock agreement.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from leaky_tokens.shared.principal import Principal

# Kinds: "api_key" (a key revoked), and about a user "user" (sessions revoked), "membership"
# (removed from an org), "role" (roles changed), or about an organisation "org" (its tokens).
USER_KINDS: frozenset[str] = frozenset({"user", "membership", "role"})


@dataclass(frozen=True, slots=True)
class PrincipalChange:
    seq: int
    kind: str
    user_id: uuid.UUID | None = None
    org_id: uuid.UUID | None = None
    api_key_id: uuid.UUID | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "kind": self.kind,
            "userId": str(self.user_id) if self.user_id else None,
            "orgId": str(self.org_id) if self.org_id else None,
            "apiKeyId": str(self.api_key_id) if self.api_key_id else None,
        }

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> PrincipalChange:
        def _id(name: str) -> uuid.UUID | None:
            value = raw.get(name)
            return uuid.UUID(value) if value else None

        return cls(int(raw["seq"]), str(raw["kind"]), _id("userId"), _id("orgId"), _id("apiKeyId"))


class PrincipalChanges:
    """The latest change `seq` per user and per organisation, as far as the feed was read."""

    def __init__(self) -> None:
        self._users: dict[uuid.UUID, int] = {}
        self._orgs: dict[uuid.UUID, int] = {}

    def apply(self, changes: list[PrincipalChange]) -> None:
        for change in changes:
            if change.kind in USER_KINDS and change.user_id is not None:
                _raise_to(self._users, change.user_id, change.seq)
            elif change.kind == "org" and change.org_id is not None:
                _raise_to(self._orgs, change.org_id, change.seq)

    def clear(self) -> None:
        self._users.clear()
        self._orgs.clear()

    def is_stale(self, principal: Principal) -> bool:
        """True when the principal was issued before a change about its user or its orgs.
        Credentials issued by a version that did not stamp `issued_seq` count as issued at 0."""
        issued = principal.issued_seq or 0
        if self._users.get(principal.user_id, 0) > issued:
            return True
        orgs = self._orgs
        return bool(orgs) and any(orgs.get(o, 0) > issued for o in principal.org_ids)


def _raise_to(latest: dict[uuid.UUID, int], key: uuid.UUID, seq: int) -> None:
    if seq > latest.get(key, 0):
        latest[key] = seq
