"""How the agent API reaches the services behind it: over HTTP, with the agent's own
credentials, so each service authorises the agent exactly as it would any caller."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import orjson

from leaky_tokens.shared.outbound import OutboundError, client_session, fetch
from leaky_tokens.shared.request_context import current_request_id


class AgentError(Exception):
    """An answer of the agent API that is not a success: status, code (of the agent code
    table), message; raised by the agent API and for services' error answers."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: Sequence[Mapping[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = list(details) if details else None
        self.headers = dict(headers) if headers else {}


def forwarded_credentials(headers: Mapping[str, str]) -> dict[str, str]:
    """The caller's own credential headers, passed on unchanged."""
    out: dict[str, str] = {}
    for name in ("x-api-key", "authorization"):
        value = headers.get(name)
        if value is not None:
            out[name] = value
    return out


class Services:
    """One connection pool to every service; opened in the gateway's lifespan."""

    def __init__(self, urls: Mapping[str, str], *, timeout_seconds: float = 10.0) -> None:
        self.urls = {name: url.rstrip("/") for name, url in urls.items()}
        self.timeout = timeout_seconds
        self._session: aiohttp.ClientSession | None = None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(
        self,
        service: str,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        expect: Sequence[int] = (200, 201, 202),
    ) -> Any:
        """The parsed JSON answer (None for an empty one); an error answer raises AgentError
        with the service's status, code and message."""
        if self._session is None:
            self._session = client_session(max_connections=128, connect_seconds=self.timeout)
        sent = dict(headers or {})
        request_id = current_request_id()
        if request_id:
            sent["x-request-id"] = request_id
        try:
            answer = await fetch(
                self._session,
                method,
                self.urls[service] + path,
                timeout_seconds=self.timeout,
                headers=sent,
                params=dict(params) if params else None,
                json_body=json_body,
            )
        except OutboundError as exc:
            raise AgentError(
                503, "SERVICE_UNAVAILABLE", f"the {service} service is unreachable"
            ) from exc
        body: Any = None
        if answer.body:
            try:
                body = orjson.loads(answer.body)
            except orjson.JSONDecodeError:
                body = None
        if answer.status in expect:
            return body
        code = "INTERNAL_ERROR" if answer.status >= 500 else "INVALID_REQUEST"
        message = f"the {service} service answered {answer.status}"
        details = None
        if isinstance(body, dict):
            code = str(body.get("code") or code)
            message = str(body.get("message") or message)
            details = body.get("details")
        if answer.status == 503:
            code = code if code != "INTERNAL_ERROR" else "SERVICE_UNAVAILABLE"
        passed = {k: v for k, v in (answer.headers or {}).items() if k.lower() in ("retry-after",)}
        raise AgentError(answer.status, code, message, details=details, headers=passed)
