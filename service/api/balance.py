"""The balancer over HTTP: counts in a window, λD/λU, and whether training may run.

``?line=`` counts that line's data only (its feedback scope, service.lines), as its jobs and
its retraining check do; without it, every event. service.line_balance answers, as it does
for the dashboard.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.api.common import AUTHED, E422, error_response_doc, merge, window_filters
from service.auth import KeyInfo, require
from service.errors import JSONResp
from service.job_schemas import LINE_PATTERN
from service.line_balance import balance_answer, scoped
from service.queries import Filters, daily_counts
from service.schemas import BalanceOut, DailyOut

router = APIRouter(prefix="/v1/balance", tags=["balance"])
Read = Annotated[KeyInfo, Depends(require("read"))]
LineQ = Annotated[str | None, Query(pattern=LINE_PATTERN,
                                    description="Only this model line's feedback (its scope).")]
E_LINE = {404: error_response_doc("No such line."),
          409: error_response_doc("The default line has no base model (PROSPECT_BASE_MODEL).")}


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
            narrowed, about = scoped(conn, state.settings, f, line)
            return JSONResp({**about, **balance_answer(conn, state.settings, narrowed)})

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
            narrowed, about = scoped(conn, state.settings, f, line)
            return JSONResp({**about, "days": daily_counts(conn, narrowed)})

    return await run_in_threadpool(run)
