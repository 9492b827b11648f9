"""Shared pieces of the routers: documented error answers and the filter parameters."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import Query

from service.errors import ApiError, error_response_doc
from service.queries import Filters
from service.text import NoNul

E400 = {400: error_response_doc("Body is not valid UTF-8 JSON.")}
E401 = {401: error_response_doc("Missing, unknown, revoked or expired API key.")}
E403 = {403: error_response_doc("The key lacks the scope this route needs.")}
E409 = {409: error_response_doc("event_id already stored with a different payload.")}
E413 = {413: error_response_doc("Body larger than PROSPECT_MAX_BODY_BYTES.")}
E422 = {422: error_response_doc("Invalid input; `errors` names each field.")}
E503 = {503: error_response_doc("Database unavailable; retry after `Retry-After` seconds.")}
E429 = {429: error_response_doc("This key's rate limit is exceeded; retry after `Retry-After` "
                                "seconds (PROSPECT_RATE_LIMIT_*).")}
AUTHED = {**E401, **E403, **E429, **E503}


def merge(*parts: dict[int, Any]) -> dict[int | str, Any]:
    out: dict[int | str, Any] = {}
    for p in parts:
        out.update(p)
    return out


def utc(name: str, value: datetime | None) -> datetime | None:
    """A query datetime in UTC. One whose UTC time falls outside the years 1..9999 (e.g.
    0001-01-01T00:00+05:00, found by fuzzing) is a 422 naming it, not a database error."""
    if value is None:
        return None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        msg = "must lie between the years 1 and 9999 in UTC"
        raise ApiError(422, "invalid", f"{name}: {msg}", [{"field": name, "message": msg}]
                       ) from None


def id_cursor(cursor: str | None, maximum: int = 2**31 - 1) -> int | None:
    """The row id a page's ``next_cursor`` named; anything else is a 422 naming ``cursor``."""
    if cursor is None:
        return None
    if not cursor.isascii() or not cursor.isdigit() or int(cursor) > maximum:
        raise ApiError(422, "invalid_cursor", "cursor: not a cursor this API issued",
                       [{"field": "cursor", "message": "malformed"}])
    return int(cursor)


def id_page(rows: list[dict[str, Any]], limit: int) -> tuple[list[dict[str, Any]], str | None]:
    """One page from ``limit + 1`` rows fetched newest first: the rows and the next cursor."""
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (str(rows[-1]["id"]) if more and rows else None)


def filters(
    since: Annotated[datetime | None, Query(description="occurred_at >= since (ISO 8601)")] = None,
    until: Annotated[datetime | None, Query(description="occurred_at < until (ISO 8601)")] = None,
    model_version: Annotated[str | None, Query(max_length=256), NoNul] = None,
    label: Annotated[Literal["up", "down"] | None, Query()] = None,
    source: Annotated[str | None, Query(max_length=256), NoNul] = None,
    include_replaced: Annotated[
        bool, Query(description="Also return votes superseded by a later `replaces`.")
    ] = False,
) -> Filters:
    return Filters(utc("since", since), utc("until", until), model_version,
                   None if label is None else label == "up", source, include_replaced)


def window_filters(
    since: Annotated[datetime | None, Query(description="occurred_at >= since (ISO 8601)")] = None,
    until: Annotated[datetime | None, Query(description="occurred_at < until (ISO 8601)")] = None,
    model_version: Annotated[str | None, Query(max_length=256), NoNul] = None,
    source: Annotated[str | None, Query(max_length=256), NoNul] = None,
) -> Filters:
    """The listing's filters minus the label (balance counts both labels)."""
    return Filters(utc("since", since), utc("until", until), model_version, None, source)
