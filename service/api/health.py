"""Liveness and readiness: /healthz never touches the database, /readyz does."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.api.common import E503
from service.errors import JSONResp
from service.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up", response_model=None,
            responses={200: {"model": Health, "description": "Up."}})
async def healthz() -> Response:
    return JSONResp({"status": "ok"})


@router.get("/readyz", summary="The database is reachable", response_model=None,
            responses={200: {"model": Health, "description": "Ready."}, **E503})
async def readyz(request: Request) -> Response:
    engine = request.app.state.engine

    def ping() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    await run_in_threadpool(ping)
    return JSONResp({"status": "ready"})
