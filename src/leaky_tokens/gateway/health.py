"""The gateway's aggregate health: every upstream's own health endpoint, asked in parallel."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

HEALTH_PATHS: dict[str, str] = {
    "auth": "/api/v1/auth/health",
    "tokens": "/api/v1/tokens/status",
    "analytics": "/api/v1/analytics/health",
    "qwen": "/api/v1/qwen/health",
    "gemini": "/api/v1/gemini/health",
    "openai": "/api/v1/openai/health",
}


async def probe(client: httpx.AsyncClient, base_url: str, path: str) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        response = await client.get(base_url + path)
        status = "UP" if response.status_code == 200 else "DOWN"
        detail = None if status == "UP" else f"HTTP {response.status_code}"
    except httpx.HTTPError as exc:
        status, detail = "DOWN", type(exc).__name__
    result: dict[str, Any] = {
        "status": status,
        "latencyMs": round((time.perf_counter() - started) * 1000, 2),
    }
    if detail:
        result["detail"] = detail
    return result


async def aggregate(client: httpx.AsyncClient, upstreams: dict[str, str]) -> dict[str, Any]:
    names = list(upstreams)
    results = await asyncio.gather(*(probe(client, upstreams[n], HEALTH_PATHS[n]) for n in names))
    services = dict(zip(names, results, strict=True))
    overall = "UP" if all(r["status"] == "UP" for r in results) else "DOWN"
    return {"service": "gateway", "status": overall, "services": services}
