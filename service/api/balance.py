"""The balancer over HTTP: counts in a window, λD/λU, and whether training may run."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.api.common import AUTHED, E422, merge, window_filters
from service.auth import KeyInfo, require
from service.balance import compute_weights
from service.errors import JSONResp
from service.queries import Filters, count_by_label, daily_counts
from service.schemas import BalanceOut, DailyOut

router = APIRouter(prefix="/v1/balance", tags=["balance"])
Read = Annotated[KeyInfo, Depends(require("read"))]


@router.get("", summary="Class counts, λD/λU and whether training is allowed",
            response_model=None,
            responses=merge({200: {"model": BalanceOut, "description": "Balance."}}, AUTHED, E422))
async def get_balance(
    request: Request, _key: Read, f: Annotated[Filters, Depends(window_filters)]
) -> Response:
    state = request.app.state

    def run() -> Response:
        with state.engine.connect() as conn:
            n_d, n_u = count_by_label(conn, f)
        r = compute_weights(n_d, n_u, state.settings.target_ratio, state.settings.min_per_class)
        return JSONResp({
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
                            AUTHED, E422))
async def get_daily(
    request: Request, _key: Read, f: Annotated[Filters, Depends(window_filters)]
) -> Response:
    engine = request.app.state.engine

    def run() -> Response:
        with engine.connect() as conn:
            return JSONResp({"days": daily_counts(conn, f)})

    return await run_in_threadpool(run)
