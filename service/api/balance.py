"""The balancer over HTTP: counts in a window, λD/λU, and whether training may run.

``?line=`` counts that line's data only (its feedback scope, service.lines), as its jobs and
its retraining check do; without it, every event.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.api.common import AUTHED, E422, error_response_doc, merge, window_filters
from service.auth import KeyInfo, require
from service.balance import compute_weights
from service.errors import JSONResp
from service.job_schemas import LINE_PATTERN
from service.lines import get_line
from service.queries import Filters, count_by_label, daily_counts, line_scope
from service.schemas import BalanceOut, DailyOut
from service.settings import Settings

router = APIRouter(prefix="/v1/balance", tags=["balance"])
Read = Annotated[KeyInfo, Depends(require("read"))]
LineQ = Annotated[str | None, Query(pattern=LINE_PATTERN,
                                    description="Only this model line's feedback (its scope).")]
E_LINE = {404: error_response_doc("No such line."),
          409: error_response_doc("The default line has no base model (PROSPECT_BASE_MODEL).")}


def _scoped(conn: Connection, settings: Settings, f: Filters, line: str | None
            ) -> tuple[Filters, dict[str, Any]]:
    """The window narrowed to the line's feedback scope, and what the answer says of it."""
    if line is None:
        return f, {"line": None, "feedback": None}
    row = get_line(conn, line, settings)
    scope = line_scope(conn, row)
    return (replace(f, served_by=scope.served_by),
            {"line": line, "feedback": row["feedback"]})


@router.get("", summary="Class counts, λD/λU and whether training is allowed",
            response_model=None,
            responses=merge({200: {"model": BalanceOut, "description": "Balance."}}, AUTHED,
                            E_LINE, E422))
async def get_balance(
    request: Request, _key: Read, f: Annotated[Filters, Depends(window_filters)],
    line: LineQ = None,
) -> Response:
    state = request.app.state

    def run() -> Response:
        with state.engine.begin() as conn:  # the default line may be made from settings
            scoped, about = _scoped(conn, state.settings, f, line)
            n_d, n_u = count_by_label(conn, scoped)
        r = compute_weights(n_d, n_u, state.settings.target_ratio, state.settings.min_per_class)
        return JSONResp({**about,
            "n_desirable": n_d, "n_undesirable": n_u, "total": n_d + n_u,
            "target_ratio": r.target_ratio, "min_per_class": state.settings.min_per_class,
            "lambda_d": r.lambda_d, "lambda_u": r.lambda_u,
            "natural_ratio": r.natural_ratio, "achieved_ratio": r.achieved_ratio,
            "allowed": r.allowed, "reason": r.reason,
        })

    return await run_in_threadpool(run)


@router.get("/daily", summary="Desirable/undesirable counts per UTC day",
            response_model=None,
            responses=merge({200: {"model": DailyOut, "description": "Daily counts."}},
                            AUTHED, E_LINE, E422))
async def get_daily(
    request: Request, _key: Read, f: Annotated[Filters, Depends(window_filters)],
    line: LineQ = None,
) -> Response:
    state = request.app.state

    def run() -> Response:
        with state.engine.begin() as conn:
            scoped, about = _scoped(conn, state.settings, f, line)
            return JSONResp({**about, "days": daily_counts(conn, scoped)})

    return await run_in_threadpool(run)
