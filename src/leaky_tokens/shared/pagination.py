"""The list envelope of DESIGN.md: {"items": [...], "pagination": {page, page_size, total, ...}}."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Query
from pydantic import BaseModel

T = TypeVar("T")

MAX_PAGE_SIZE = 100


@dataclass(frozen=True, slots=True)
class PageRequest:
    page: int
    page_size: int

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.page_size


def _page_request(
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 20,
) -> PageRequest:
    return PageRequest(page, page_size)


PageParams = Annotated[PageRequest, Depends(_page_request)]


class Pagination(BaseModel):
    page: int
    page_size: int
    total: int
    total_pages: int

    @classmethod
    def of(cls, page: int, page_size: int, total: int) -> Pagination:
        return cls(
            page=page, page_size=page_size, total=total, total_pages=total_pages(total, page_size)
        )


def total_pages(total: int, page_size: int) -> int:
    return math.ceil(total / page_size) if total else 0


class Page(BaseModel, Generic[T]):
    items: list[T]
    pagination: Pagination


def page_of(items: list[Any], request: PageRequest, total: int) -> dict[str, Any]:
    return {
        "items": items,
        "pagination": {
            "page": request.page,
            "page_size": request.page_size,
            "total": total,
            "total_pages": total_pages(total, request.page_size),
        },
    }
