"""The outbound interface over httpx, so tests can serve provider calls from httpx's in-process
transports (MockTransport, ASGITransport). Tests only: httpx is not a runtime dependency."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from leaky_tokens.shared.outbound import OutboundError, OutboundResponse


class HttpxOutbound:
    def __init__(
        self, transport: httpx.AsyncBaseTransport, *, headers: dict[str, str] | None = None
    ) -> None:
        self._client = httpx.AsyncClient(transport=transport, headers=headers)

    async def post_json(self, url: str, payload: Any) -> OutboundResponse:
        try:
            response = await self._client.post(
                url, content=orjson.dumps(payload), headers={"content-type": "application/json"}
            )
        except httpx.TimeoutException:
            raise TimeoutError from None
        except httpx.HTTPError as exc:
            raise OutboundError("broken", type(exc).__name__) from None
        return OutboundResponse(response.status_code, response.content)

    async def aclose(self) -> None:
        await self._client.aclose()
