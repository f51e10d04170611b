"""The id of the request being served, visible to logs and error bodies."""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
_ACCEPTABLE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def current_request_id() -> str | None:
    return _request_id.get()


def set_request_id(value: str | None) -> None:
    _request_id.set(value)


def new_request_id(offered: str | None = None) -> str:
    """Echo a well-formed client id; otherwise mint `req_<32 hex>`."""
    if offered and _ACCEPTABLE.match(offered):
        return offered
    return f"req_{uuid.uuid4().hex}"
