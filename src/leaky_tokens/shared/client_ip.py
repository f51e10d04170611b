"""The caller's address, trusting X-Forwarded-For only from our own proxies (the gateway)."""

from __future__ import annotations

from starlette.requests import Request

TRUSTED_PROXIES = frozenset({"127.0.0.1", "::1"})


def client_ip(request: Request, trusted: frozenset[str] = TRUSTED_PROXIES) -> str:
    peer = request.client.host if request.client else "unknown"
    if peer in trusted:
        forwarded = request.headers.get("x-forwarded-for")
        if forwarded:
            return forwarded.split(",")[0].strip() or peer
    return peer
