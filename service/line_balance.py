"""The class balance as one model line sees it: GET /v1/balance?line= and the dashboard both
answer through here, so the API and the page can never disagree on a line's counts.

A line's feedback scope (service.lines) narrows the window; without a line, every event
counts (what /v1/balance and the dashboard always answered without one).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from sqlalchemy import Connection

from service.balance import compute_weights
from service.errors import ApiError
from service.job_schemas import LINE_PATTERN
from service.lines import get_line
from service.queries import Filters, count_by_label, line_scope
from service.settings import Settings

_LINE_RE = re.compile(LINE_PATTERN)


def check_line(value: str | None) -> str | None:
    """A ``line`` query value as given, or a 422 naming ``line`` (never a lookup of junk)."""
    if value is None or _LINE_RE.fullmatch(value):
        return value
    msg = "must match " + LINE_PATTERN
    raise ApiError(422, "invalid", f"line: {msg}", [{"field": "line", "message": msg}])


def scoped(conn: Connection, settings: Settings, f: Filters, line: str | None
           ) -> tuple[Filters, dict[str, Any]]:
    """The window narrowed to the line's feedback scope, and what the answer says of it
    (``line``/``feedback``; both None without a line). 404/409 from get_line."""
    if line is None:
        return f, {"line": None, "feedback": None}
    row = get_line(conn, line, settings)
    scope = line_scope(conn, row)
    return (replace(f, served_by=scope.served_by),
            {"line": line, "feedback": row["feedback"]})


def balance_answer(conn: Connection, settings: Settings, f: Filters) -> dict[str, Any]:
    """Counts (latest vote each), λD/λU and whether training may run over ``f``."""
    n_d, n_u = count_by_label(conn, f)
    r = compute_weights(n_d, n_u, settings.target_ratio, settings.min_per_class)
    return {"n_desirable": n_d, "n_undesirable": n_u, "total": n_d + n_u,
            "target_ratio": r.target_ratio, "min_per_class": settings.min_per_class,
            "lambda_d": r.lambda_d, "lambda_u": r.lambda_u,
            "natural_ratio": r.natural_ratio, "achieved_ratio": r.achieved_ratio,
            "allowed": r.allowed, "reason": r.reason}
