"""Base models for request/response bodies: camelCase on the wire, strict about unknown input."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)


class RequestModel(ApiModel):
    """Request bodies ignore nothing silently: an unknown field is a 400."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, frozen=True, extra="forbid"
    )


def _assume_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcInput = Annotated[datetime, AfterValidator(_assume_utc)]


class HealthRead(ApiModel):
    service: str
    status: str
    checks: dict[str, str] = {}
