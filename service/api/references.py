"""π_ref snapshots and model lines over HTTP.

A snapshot is taken by a worker on the `default` queue (it reads the model's files); the API
answers 202 with the pending row, which the client polls.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.api.common import AUTHED, E422, error_response_doc, merge
from service.auth import KeyInfo, require
from service.errors import ApiError, JSONResp
from service.job_schemas import LINE_PATTERN, LineIn, LineOut, SnapshotIn, SnapshotOut
from service.lines import DEFAULT_LINE, get_line, list_lines, put_line
from service.queue import DEFAULT_QUEUE, SNAPSHOT_TASK, send
from service.references import (
    delete_snapshot_row,
    get_snapshot,
    list_snapshots,
    remove_snapshot_files,
    request_snapshot,
)
from service.registry import production_source

router = APIRouter(tags=["references"])
Admin = Annotated[KeyInfo, Depends(require("admin"))]
Read = Annotated[KeyInfo, Depends(require("read"))]
SnapId = Annotated[int, Path(ge=1, le=2**31 - 1)]
LineName = Annotated[str, Path(pattern=LINE_PATTERN)]
E404 = {404: error_response_doc("No such snapshot or line.")}
E409 = {409: error_response_doc("The snapshot is in use or still pending.")}
E409_LINE = {409: error_response_doc("The default line's base model is PROSPECT_BASE_MODEL.")}
_PUBLIC = tuple(SnapshotOut.model_fields)


def _public(snap: dict[str, Any]) -> dict[str, Any]:
    """The documented fields only: the claim token guards the worker's writes and stays inside."""
    return {k: snap[k] for k in _PUBLIC}


@router.post("/v1/references", status_code=202, summary="Snapshot the line's production model",
             response_model=None,
             responses=merge({202: {"model": SnapshotOut, "description": "Pending."}},
                             AUTHED, E404, E409, E422))
async def create_snapshot(request: Request, key: Admin, body: SnapshotIn | None = None
                          ) -> Response:
    state = request.app.state
    line = (body or SnapshotIn()).line

    def run() -> Response:
        with state.engine.begin() as conn:
            source = production_source(conn, state.settings, line)
            snap = request_snapshot(conn, line, source, key.id)
        sent = send(state.celery, SNAPSHOT_TASK, [snap["id"]], queue=DEFAULT_QUEUE)
        return JSONResp({**_public(snap), "enqueued": sent}, status_code=202,
                        headers={"Location": f"/v1/references/{snap['id']}"})

    return await run_in_threadpool(run)


@router.get("/v1/references", summary="Snapshots, newest first", response_model=None,
            responses=merge({200: {"description": "Snapshots."}}, AUTHED, E422))
async def list_(request: Request, _key: Read,
                line: Annotated[str | None, Query(pattern=LINE_PATTERN)] = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> Response:
    engine = request.app.state.engine

    def run() -> Response:
        with engine.connect() as conn:
            return JSONResp({"references": [_public(s) for s in list_snapshots(conn, line, limit)]})

    return await run_in_threadpool(run)


@router.get("/v1/references/{snapshot_id}", summary="One snapshot", response_model=None,
            responses=merge({200: {"model": SnapshotOut, "description": "The snapshot."}},
                            AUTHED, E404, E422))
async def get(request: Request, snapshot_id: SnapId, _key: Read) -> Response:
    engine = request.app.state.engine

    def run() -> Response:
        with engine.connect() as conn:
            return JSONResp(_public(get_snapshot(conn, snapshot_id)))

    return await run_in_threadpool(run)


@router.delete("/v1/references/{snapshot_id}", summary="Delete an unused snapshot",
               response_model=None,
               responses=merge({200: {"model": SnapshotOut, "description": "Deleted."}},
                               AUTHED, E404, E409, E422))
async def delete(request: Request, snapshot_id: SnapId, _key: Admin) -> Response:
    engine = request.app.state.engine

    def run() -> Response:
        with engine.begin() as conn:
            snap = delete_snapshot_row(conn, snapshot_id)
        if snap["path"] and snap["status"] == "ready":
            remove_snapshot_files(snap["path"])
        return JSONResp({**_public(snap), "deleted": True})

    return await run_in_threadpool(run)


@router.get("/v1/lines", summary="Model lines", response_model=None,
            responses=merge({200: {"description": "Lines."}}, AUTHED))
async def lines(request: Request, _key: Read) -> Response:
    state = request.app.state

    def run() -> Response:
        with state.engine.begin() as conn:
            return JSONResp({"lines": list_lines(conn, state.settings)})

    return await run_in_threadpool(run)


@router.put("/v1/lines/{name}", summary="Create a model line or change its base model or "
            "feedback scope",
            response_model=None,
            responses=merge({200: {"model": LineOut, "description": "The line."}}, AUTHED,
                            E409_LINE, E422))
async def put(request: Request, name: LineName, body: LineIn, _key: Admin) -> Response:
    engine = request.app.state.engine
    configured = request.app.state.settings.base_model
    if (name == DEFAULT_LINE and configured and body.base_model is not None
            and body.base_model != configured):
        # get_line() syncs the default line from the setting on every use: a change here
        # would be answered and then silently undone.
        msg = (f"the default line's base model is PROSPECT_BASE_MODEL ({configured!r}); "
               "change that setting instead")
        raise ApiError(409, "base_model_from_settings", f"base_model: {msg}",
                       [{"field": "base_model", "message": msg}])

    def run() -> Response:
        with engine.begin() as conn:
            if name == DEFAULT_LINE and configured:
                get_line(conn, name, request.app.state.settings)  # made from the setting
            return JSONResp(put_line(conn, name, body.base_model, body.feedback))

    return await run_in_threadpool(run)
