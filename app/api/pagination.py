"""Cursor pagination over time-ordered ids: newest first, `after` = the last id of the previous page."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.errors import ApiError

T = TypeVar("T")

MAX_PAGE_SIZE = 100


def newest_first(
    session: Session,
    query: Select[T],
    id_column: InstrumentedAttribute[Any],
    *,
    id_prefix: str,
    after: str | None,
    limit: int,
) -> tuple[Sequence[T], bool]:
    """One page of `query` and whether more follow; the cursor must be an id of the same kind."""
    if after is not None:
        if not re.fullmatch(rf"{id_prefix}_[0-9a-f]{{28}}", after):
            raise ApiError(400, "invalid_cursor", f"after must be an id starting with {id_prefix}_", "after")
        query = query.where(id_column < after)
    rows = session.scalars(query.order_by(id_column.desc()).limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit
