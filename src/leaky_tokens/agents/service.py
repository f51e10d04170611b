"""The agent API's rules: the journey of `spec/e2e-and-security-tests.txt`, composed from the
auth service (accounts, keys, tokens, session credentials), the token service (pools, session
budgets, purchases) and the model catalogue.

A session is created in three steps, each idempotent, so a retry or a crash between them
converges: the token service records the session (one per idempotency key), the auth service
issues its credential (an API key bound to the session, expiring with it), and the token service
activates it (moves the budget, attaches the credential; only one activation wins, a losing
credential is revoked at once).
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from leaky_tokens import __version__
from leaky_tokens.agents.catalogue import model_catalogue, products
from leaky_tokens.agents.health import assess
from leaky_tokens.agents.upstreams import AgentError, Services
from leaky_tokens.settings import AgentProduct, Settings
from leaky_tokens.shared.principal import Principal

log = logging.getLogger("leaky_tokens.agents")

Headers = Mapping[str, str]
OpenProviders = Callable[[], Awaitable[set[str]]]


def _page(body: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    return list(body["items"]), dict(body["pagination"])


class AgentService:
    def __init__(self, settings: Settings, services: Services, open_providers: OpenProviders):
        self.settings = settings
        self.agents = settings.agents
        self.services = services
        self.open_providers = open_providers
        self.public_url = (settings.agents.public_base_url or settings.url_of("gateway")).rstrip(
            "/"
        )

    # views
    def proxy_of(self, credential: str, model: str) -> dict[str, Any]:
        return {
            "protocol": "openai",
            "full_url": f"{self.public_url}/v1/s/{credential}",
            "base_url": f"{self.public_url}/v1",
            "api_key": credential,
            "model": model,
        }

    def session_view(self, s: Mapping[str, Any]) -> dict[str, Any]:
        active = s["status"] == "active" and s.get("credential")
        return {
            "session_id": s["id"],
            "status": s["status"],
            "product_no": s["productNo"],
            "product_type": s["productType"],
            "model": s["model"],
            "provider": s["provider"],
            "token_budget": s["tokenBudget"],
            "budget_remaining": s["budgetLeft"],
            "tokens_in_flight": s["inFlight"],
            "tokens_used": s["spent"],
            "tokens_returned": s["returned"],
            "rotations": s["rotations"],
            "failure_code": s["failureCode"],
            "close_reason": s["closeReason"],
            "created_at": s["createdAt"],
            "activated_at": s["activatedAt"],
            "expires_at": s["expiresAt"],
            "closed_at": s["closedAt"],
            "proxy": self.proxy_of(s["credential"], s["model"]) if active else None,
        }

    # health, accounts, tokens
    def health(self) -> dict[str, Any]:
        return {"status": "ok", "service": "leaky-tokens agent API", "version": __version__}

    async def register(self, name: str, email: str | None) -> dict[str, Any]:
        secret = secrets.token_urlsafe(32)
        account = await self.services.call(
            "auth",
            "POST",
            "/api/v1/auth/register",
            json_body={
                "username": name,
                "email": email or f"{name}@agents.invalid",
                "password": secret,
            },
        )
        key = await self.services.call(
            "auth",
            "POST",
            "/api/v1/auth/api-keys",
            headers={"authorization": f"Bearer {account['token']}"},
            json_body={"name": "agent key"},
        )
        return {
            "agent_id": account["userId"],
            "name": account["username"],
            "api_key": key["rawKey"],
            "api_key_id": key["id"],
            "api_secret": secret,
            "notice": "api_key and api_secret are shown once; only hashes are stored",
        }

    async def issue_token(self, api_key: str, api_secret: str) -> dict[str, Any]:
        try:
            found = await self.services.call(
                "auth", "GET", "/api/v1/auth/api-keys/validate", headers={"x-api-key": api_key}
            )
        except AgentError as exc:
            if exc.status == 401:
                raise AgentError(401, exc.code, "invalid api_key or api_secret") from exc
            raise
        if found.get("sessionId"):
            raise AgentError(
                403, "FORBIDDEN", "a session credential cannot be exchanged for a token"
            )
        try:
            issued = await self.services.call(
                "auth",
                "POST",
                "/api/v1/auth/login",
                json_body={"username": found["username"], "password": api_secret},
            )
        except AgentError as exc:
            if exc.status == 401:
                raise AgentError(401, "AUTH_INVALID_KEY", "invalid api_key or api_secret") from exc
            raise
        return {
            "access_token": issued["token"],
            "token_type": "Bearer",
            "expires_in": issued["expiresIn"],
        }

    async def account_info(self, creds: Headers) -> dict[str, Any]:
        me = await self.services.call("auth", "GET", "/api/v1/auth/me", headers=creds)
        return {
            "agent_id": me["userId"],
            "name": me["username"],
            "roles": me["roles"],
            "org_ids": me["orgIds"],
            "auth_method": "bearer" if me["method"] == "jwt" else "api_key",
        }

    # products and balance
    def products(self) -> list[dict[str, Any]]:
        catalogue = model_catalogue(self.settings)
        return [
            {
                "product_no": p.product_no,
                "type": p.type,
                "description": p.description,
                "models": [
                    {
                        "model": m,
                        "provider": catalogue[m].provider,
                        "context_window": catalogue[m].context_window,
                        "max_output_tokens": catalogue[m].max_output_tokens,
                    }
                    for m in p.models
                ],
                "providers": sorted({catalogue[m].provider for m in p.models}),
            }
            for p in products(self.settings)
        ]

    def product(self, product_no: str) -> AgentProduct:
        for p in products(self.settings):
            if p.product_no == product_no:
                return p
        message = f"unknown product_no {product_no!r}; see GET /v1/products"
        raise AgentError(
            400,
            "INVALID_REQUEST",
            message,
            details=[{"field": "product_no", "message": "no such product"}],
        )

    async def balance(
        self, creds: Headers, page: int, page_size: int
    ) -> tuple[list[Any], dict[str, Any]]:
        body = await self.services.call(
            "tokens",
            "GET",
            "/api/v1/tokens/quotas",
            headers=creds,
            params={"page": page, "page_size": page_size},
        )
        items, pagination = _page(body)
        return [
            {
                "provider": p["provider"],
                "owner_kind": p["kind"],
                "owner_id": p["ownerId"],
                "total_tokens": p["totalTokens"],  # allowance + credit at a window's start
                "available_tokens": p["remainingTokens"],  # what can be spent now
                "resets_at": p["resetAt"],
            }
            for p in items
        ], pagination

    # sessions
    async def _healthy_models(self, product: AgentProduct) -> list[str]:
        catalogue = model_catalogue(self.settings)
        open_now = await self.open_providers()
        return [m for m in product.models if catalogue[m].provider not in open_now]

    async def _revoke(self, creds: Headers, key_id: str | None) -> None:
        if not key_id:
            return
        try:
            await self.services.call(
                "auth",
                "DELETE",
                f"/api/v1/auth/api-keys/{key_id}",
                headers=creds,
                expect=(204, 200),
            )
        except AgentError as exc:
            if exc.status != 404:
                raise

    async def _issue_credential(
        self, creds: Headers, session: Mapping[str, Any], generation: int
    ) -> tuple[str, str]:
        key = await self.services.call(
            "auth",
            "POST",
            "/api/v1/auth/api-keys",
            headers=creds,
            json_body={
                "name": f"session {session['id']} #{generation}",
                "expiresAt": session["expiresAt"],
                "sessionId": session["id"],
            },
        )
        return str(key["rawKey"]), str(key["id"])

    async def create_session(
        self, creds: Headers, idempotency_key: str | None, body: Mapping[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        product = self.product(body["product_no"])
        healthy = await self._healthy_models(product)
        model = (healthy or product.models)[0]
        provider = model_catalogue(self.settings)[model].provider
        lifetime = body.get("lifetime_seconds") or self.agents.default_lifetime_seconds
        found = await self.services.call(
            "tokens",
            "POST",
            "/api/v1/tokens/sessions",
            headers=creds,
            json_body={
                "idempotencyKey": idempotency_key,
                "productNo": product.product_no,
                "productType": product.type,
                "model": model,
                "provider": provider,
                "tokenBudget": body["token_budget"],
                "lifetimeSeconds": lifetime,
            },
        )
        created = bool(found.pop("created", False))
        if found["status"] == "pending":
            credential, key_id = await self._issue_credential(creds, found, 0)
            try:
                found = await self.services.call(
                    "tokens",
                    "POST",
                    f"/api/v1/tokens/sessions/{found['id']}/activate",
                    headers=creds,
                    json_body={"credential": credential, "credentialKeyId": key_id},
                )
            except AgentError:
                await self._revoke(creds, key_id)
                raise
            if not found.pop("activated", False):
                await self._revoke(creds, key_id)  # another request activated it first
        if found["status"] == "failed":
            raise AgentError(
                402,
                found["failureCode"] or "INSUFFICIENT_BALANCE",
                "this session could not be funded: the pool cannot cover its budget",
            )
        return self.session_view(found), created

    async def get_session(self, creds: Headers, session_id: uuid.UUID) -> dict[str, Any]:
        found = await self.services.call(
            "tokens", "GET", f"/api/v1/tokens/sessions/{session_id}", headers=creds
        )
        return self.session_view(found)

    async def list_sessions(
        self, creds: Headers, page: int, page_size: int, status: str | None
    ) -> tuple[list[Any], dict[str, Any]]:
        params: dict[str, Any] = {"page": page, "page_size": page_size}
        if status:
            params["status"] = status
        body = await self.services.call(
            "tokens", "GET", "/api/v1/tokens/sessions", headers=creds, params=params
        )
        items, pagination = _page(body)
        return [self.session_view(s) for s in items], pagination

    async def report_event(
        self, creds: Headers, session_id: uuid.UUID, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        recorded = await self.services.call(
            "tokens",
            "POST",
            f"/api/v1/tokens/sessions/{session_id}/events",
            headers=creds,
            json_body={
                "source": "agent",
                "outcome": body["type"],
                "statusCode": body.get("status_code"),
                "latencyMs": body.get("latency_ms"),
                "errorKind": body.get("error_kind"),
                "message": body.get("message"),
            },
        )
        return {
            "event_id": recorded["id"],
            "session_id": str(session_id),
            "type": body["type"],
            "recorded_at": recorded["createdAt"],
        }

    async def session_health(self, creds: Headers, session_id: uuid.UUID) -> dict[str, Any]:
        found = await self.services.call(
            "tokens",
            "GET",
            f"/api/v1/tokens/sessions/{session_id}/events",
            headers=creds,
            params={"limit": self.agents.health_window_events + 50},
        )
        session = found["session"]
        health = assess(found["items"], self.agents)
        rotations = [e for e in found["items"] if e["source"] == "rotation"]
        return {
            "session_id": session["id"],
            "session_status": session["status"],
            "model": session["model"],
            "provider": session["provider"],
            "budget_remaining": session["budgetLeft"],
            "tokens_used": session["spent"],
            "token_budget": session["tokenBudget"],
            "last_rotation": rotations[0]["detail"] if rotations else None,
            **health,
        }

    async def rotate_session(
        self, creds: Headers, session_id: uuid.UUID, reason: str
    ) -> dict[str, Any]:
        current = await self.services.call(
            "tokens", "GET", f"/api/v1/tokens/sessions/{session_id}", headers=creds
        )
        if current["status"] != "active":
            raise AgentError(409, "SESSION_NOT_ACTIVE", f"the session is {current['status']}")
        model = current["model"]
        moved = False
        if current["productType"] == "dynamic":
            product = self.product(current["productNo"])
            healthy = set(await self._healthy_models(product))
            order = product.models
            start = order.index(model) + 1 if model in order else 0
            for step in range(len(order) - 1 if model in order else len(order)):
                candidate = order[(start + step) % len(order)]
                if candidate in healthy and candidate != model:
                    model, moved = candidate, True
                    break
        provider = model_catalogue(self.settings)[model].provider
        credential, key_id = await self._issue_credential(
            creds, current, int(current["rotations"]) + 1
        )
        try:
            rotated = await self.services.call(
                "tokens",
                "POST",
                f"/api/v1/tokens/sessions/{session_id}/rotate",
                headers=creds,
                json_body={
                    "expectedKeyId": current["credentialKeyId"],
                    "model": model,
                    "provider": provider,
                    "credential": credential,
                    "credentialKeyId": key_id,
                    "reason": reason,
                },
            )
        except AgentError:
            await self._revoke(creds, key_id)
            raise
        previous = rotated.pop("previous")
        await self._revoke(creds, previous["credentialKeyId"])  # the old one dies now
        return {
            **self.session_view(rotated),
            "rotation": {
                "reason": reason,
                "moved": moved,
                "from_model": previous["model"],
                "to_model": model,
                "from_provider": previous["provider"],
                "to_provider": provider,
            },
        }

    async def terminate_session(self, creds: Headers, session_id: uuid.UUID) -> dict[str, Any]:
        current = await self.services.call(
            "tokens", "GET", f"/api/v1/tokens/sessions/{session_id}", headers=creds
        )
        # The credential dies first (within a second everywhere, through the revocation feed);
        # then the budget goes back. A crash between the two leaves a dead credential and a
        # budget the sweeper returns at expiry, or the next terminate returns at once.
        await self._revoke(creds, current.get("credentialKeyId"))
        closed = await self.services.call(
            "tokens",
            "POST",
            f"/api/v1/tokens/sessions/{session_id}/close",
            headers=creds,
            json_body={"reason": "terminated by its owner"},
        )
        return self.session_view(closed)

    # billing and stats
    async def recharge(
        self, creds: Headers, principal: Principal, key: str | None, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        headers = dict(creds)
        if key is not None:
            headers["idempotency-key"] = key
        saga = await self.services.call(
            "tokens",
            "POST",
            "/api/v1/tokens/purchase",
            headers=headers,
            json_body={
                "userId": str(principal.user_id),
                "provider": body["provider"],
                "tokens": body["tokens"],
            },
        )
        return {
            "order_id": saga["sagaId"],
            "status": _order_status(saga["status"]),
            "saga_status": saga["status"],
            "provider": body["provider"],
            "tokens": body["tokens"],
            "created_at": saga["createdAt"],
            "payment": "none (stub payment; no real charge)",
        }

    async def recharge_status(self, creds: Headers, order_id: str) -> dict[str, Any]:
        saga = await self.services.call(
            "tokens", "GET", f"/api/v1/tokens/purchase/{order_id}", headers=creds
        )
        return {
            "order_id": saga["id"],
            "status": _order_status(saga["status"]),
            "saga_status": saga["status"],
            "provider": saga["provider"],
            "tokens": saga["tokens"],
            "failure_reason": saga["failureReason"],
            "created_at": saga["createdAt"],
            "updated_at": saga["updatedAt"],
        }

    async def stats_overview(self, creds: Headers) -> dict[str, Any]:
        stats = await self.services.call(
            "tokens", "GET", "/api/v1/tokens/sessions/stats", headers=creds
        )
        pools = await self.services.call(
            "tokens", "GET", "/api/v1/tokens/quotas", headers=creds, params={"page_size": 100}
        )
        by_status = stats["byStatus"]
        counts = {s: by_status.get(s, {}).get("sessions", 0) for s in _STATUSES}
        budgeted = sum(
            v["budget"] for k, v in by_status.items() if k in ("active", "terminated", "expired")
        )
        returned = sum(v["returned"] for v in by_status.values())
        left = stats["activeBudgetLeft"]
        return {
            "sessions": {"total": sum(counts.values()), **counts},
            "tokens": {
                "budgeted": budgeted,
                "active_budget_remaining": left,
                "returned": returned,
                "used_or_in_flight": max(0, budgeted - returned - left),
            },
            "balance": {
                "pools": pools["pagination"]["total"],
                "available_tokens": sum(p["remainingTokens"] for p in pools["items"]),
            },
        }


_STATUSES = ("pending", "active", "terminated", "expired", "failed")


def _order_status(saga_status: str) -> str:
    if saga_status == "COMPLETED":
        return "completed"
    if saga_status == "FAILED":
        return "failed"
    return "pending"
