"""The gateway's aggregate health: every upstream's own health endpoint, asked in parallel."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from leaky_tokens.shared.outbound import OutboundError, fetch

HEALTH_PATHS: dict[str, str] = {
    "auth": "/api/v1/auth/health",
    "tokens": "/api/v1/tokens/status",
    "analytics": "/api/v1/analytics/health",
    "qwen": "/api/v1/qwen/health",
    "gemini": "/api/v1/gemini/health",
    "openai": "/api/v1/openai/health",
}


async def probe(
    session: aiohttp.ClientSession, base_url: str, path: str, timeout_seconds: float
) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        response = await fetch(session, "GET", base_url + path, timeout_seconds=timeout_seconds)
        status = "UP" if response.status == 200 else "DOWN"
        detail = None if status == "UP" else f"HTTP {response.status}"
    except OutboundError as exc:
        status, detail = "DOWN", exc.reason
    result: dict[str, Any] = {
        "status": status,
        "latencyMs": round((time.perf_counter() - started) * 1000, 2),
    }
    if detail:
        result["detail"] = detail
    return result


async def aggregate(
    session: aiohttp.ClientSession, upstreams: dict[str, str], timeout_seconds: float
) -> dict[str, Any]:
    names = list(upstreams)
    results = await asyncio.gather(
        *(probe(session, upstreams[n], HEALTH_PATHS[n], timeout_seconds) for n in names)
    )
    services = dict(zip(names, results, strict=True))
    overall = "UP" if all(r["status"] == "UP" for r in results) else "DOWN"
    return {"service": "gateway", "status": overall, "services": services}
