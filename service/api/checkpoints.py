"""The checkpoint registry over HTTP: list with lineage, promote, reject, roll back, audit trail,
live comparison, storage and retention. Read scope to view, admin scope to change.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service import registry, retention
from service.api.common import AUTHED, E422, error_response_doc, id_cursor, id_page, merge
from service.auth import KeyInfo, require
from service.errors import JSONResp
from service.job_schemas import LINE_PATTERN
from service.live import live_report
from service.notify import list_notifications
from service.queue import DEFAULT_QUEUE, NOTIFY_TASK, SNAPSHOT_TASK, send
from service.registry_schemas import (
    ChangeOut,
    CheckpointOut,
    CheckpointPage,
    CleanupIn,
    PromoteIn,
    RejectIn,
    RejectOut,
    RollbackIn,
    RolloutEventPage,
)

router = APIRouter(tags=["registry"])
Admin = Annotated[KeyInfo, Depends(require("admin"))]
Read = Annotated[KeyInfo, Depends(require("read"))]
CkptId = Annotated[int, Path(ge=1, le=2**31 - 1)]
LineQ = Annotated[str, Query(pattern=LINE_PATTERN)]
E404 = {404: error_response_doc("No such checkpoint or line.")}
E409 = {409: error_response_doc("The checkpoint's stage does not allow it, another canary "
                                "runs, or the line changed meanwhile; `errors` names the field.")}
_PUBLIC = list(CheckpointOut.model_fields)


def checkpoint_out(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    out = {k: row.get(k) for k in _PUBLIC if k != "parent_version"}
    out["parent_version"] = (registry.model_version(row["line"], row["parent_id"])
                             if row["parent_id"] is not None
                             else registry.base_version(row["line"]))
    return out


def _after_change(state: Any, change: registry.Change) -> bool:
    """Send the new production's π_ref snapshot to a worker, wake the webhook sender, and
    drop this process's serving cache."""
    state.serving.clear()
    sent = True
    if change.snapshot_id is not None:
        sent = send(state.celery, SNAPSHOT_TASK, [change.snapshot_id], queue=DEFAULT_QUEUE)
    if state.settings.webhook_url:
        send(state.celery, NOTIFY_TASK, [], queue=DEFAULT_QUEUE)
    return sent


@router.get("/v1/checkpoints", summary="Checkpoints with lineage, newest first",
            response_model=None,
            responses=merge({200: {"model": CheckpointPage, "description": "A page."}},
                            AUTHED, E422))
async def list_(
    request: Request, _key: Read,
    line: Annotated[str | None, Query(pattern=LINE_PATTERN)] = None,
    stage: Annotated[Literal["pending", "candidate", "canary", "production", "retired",
                             "rejected"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=32)] = None,
) -> Response:
    engine = request.app.state.engine
    before = id_cursor(cursor)

    def run() -> Response:
        with engine.connect() as conn:
            rows = registry.list_checkpoints(conn, line=line, stage=stage, limit=limit + 1,
                                             before_id=before)
        rows, next_cursor = id_page(rows, limit)
        return JSONResp({"checkpoints": [checkpoint_out(r) for r in rows], "next_cursor": next_cursor})

    return await run_in_threadpool(run)


@router.get("/v1/checkpoints/{checkpoint_id}",
            summary="One checkpoint, its lineage back to the base model, and its audit trail",
            response_model=None,
            responses=merge({200: {"model": CheckpointOut, "description": "The checkpoint."}},
                            AUTHED, E404, E422))
async def get(request: Request, checkpoint_id: CkptId, _key: Read) -> Response:
    engine = request.app.state.engine

    def run() -> Response:
        with engine.connect() as conn:
            row = registry.get_checkpoint(conn, checkpoint_id)
            chain = registry.lineage(conn, row)
            events = registry.list_events(conn, line=None, checkpoint_id=checkpoint_id,
                                          limit=1000, before_id=None)
        return JSONResp({**(checkpoint_out(row) or {}), "lineage": chain, "events": events})

    return await run_in_threadpool(run)


@router.post("/v1/checkpoints/{checkpoint_id}/promote",
             summary="Start or re-weight a canary, or make a checkpoint production",
             response_model=None,
             responses=merge({200: {"model": ChangeOut, "description": "Promoted."}},
                             AUTHED, E404, E409, E422))
async def promote(request: Request, checkpoint_id: CkptId, body: PromoteIn, key: Admin
                  ) -> Response:
    state = request.app.state

    def run() -> Response:
        change = registry.promote(state.engine, state.settings, checkpoint_id, body.stage,
                                  body.percent, registry.Actor.key(key.id), body.reason)
        sent = _after_change(state, change)
        row = change.checkpoint or {}
        serving = (change.version if body.stage == "production"
                   else _production_version(state, row["line"]))
        return JSONResp({"line": row["line"], "checkpoint": checkpoint_out(change.checkpoint),
                         "previous": checkpoint_out(change.previous), "serving": serving,
                         "reference_snapshot_id": change.snapshot_id, "enqueued": sent})

    return await run_in_threadpool(run)


@router.post("/v1/checkpoints/{checkpoint_id}/reject",
             summary="Reject a pending or candidate checkpoint; a running evaluation stops",
             response_model=None,
             responses=merge({200: {"model": RejectOut, "description": "Rejected."}},
                             AUTHED, E404, E409, E422))
async def reject(request: Request, checkpoint_id: CkptId, key: Admin,
                 body: RejectIn | None = None) -> Response:
    """For a checkpoint that never served (canary and production: POST /v1/rollback). A
    queued evaluation never runs; a running one is stopped by its worker within seconds."""
    state = request.app.state
    reason = (body or RejectIn()).reason

    def run() -> Response:
        change = registry.reject(state.engine, state.settings, checkpoint_id,
                                 registry.Actor.key(key.id), reason)
        _after_change(state, change)
        row = change.checkpoint or {}
        return JSONResp({"line": row["line"], "checkpoint": checkpoint_out(row),
                         "previous_stage": change.from_stage,
                         "stopping_evaluation": change.evaluation_running})

    return await run_in_threadpool(run)


def _production_version(state: Any, line: str) -> str:
    with state.engine.begin() as conn:
        return registry.serving_state(conn, state.settings, line).production_version


@router.post("/v1/rollback", summary="Roll back a line's production (or its canary)",
             response_model=None,
             responses=merge({200: {"model": ChangeOut, "description": "Rolled back."}},
                             AUTHED, E404, E409, E422))
async def rollback(request: Request, body: RollbackIn, key: Admin) -> Response:
    state = request.app.state

    def run() -> Response:
        change = registry.rollback(state.engine, state.settings, body.line,
                                   registry.Actor.key(key.id), body.target, body.reason)
        sent = _after_change(state, change)
        return JSONResp({"line": body.line, "checkpoint": checkpoint_out(change.checkpoint),
                         "previous": checkpoint_out(change.previous), "serving": change.version,
                         "reference_snapshot_id": change.snapshot_id, "enqueued": sent})

    return await run_in_threadpool(run)


@router.get("/v1/rollout-events", summary="The audit trail of stage changes, newest first",
            response_model=None,
            responses=merge({200: {"model": RolloutEventPage, "description": "Events."}},
                            AUTHED, E422))
async def events(
    request: Request, _key: Read,
    line: Annotated[str | None, Query(pattern=LINE_PATTERN)] = None,
    checkpoint_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=32)] = None,
) -> Response:
    engine = request.app.state.engine
    before = id_cursor(cursor, 2**63 - 1)

    def run() -> Response:
        with engine.connect() as conn:
            rows = registry.list_events(conn, line=line, checkpoint_id=checkpoint_id,
                                        limit=limit + 1, before_id=before)
        rows, next_cursor = id_page(rows, limit)
        return JSONResp({"events": rows, "next_cursor": next_cursor})

    return await run_in_threadpool(run)


@router.get("/v1/live", summary="Canary vs production: thumbs-up rates, intervals, the guard",
            response_model=None,
            responses=merge({200: {"description": "Live comparison."}}, AUTHED, E404, E422))
async def live(request: Request, _key: Read, line: LineQ = "default") -> Response:
    state = request.app.state

    def run() -> Response:
        with state.engine.begin() as conn:
            return JSONResp(live_report(conn, state.settings, line).as_dict())

    return await run_in_threadpool(run)


@router.get("/v1/storage", summary="Disk used by artifacts, and what retention would remove",
            response_model=None,
            responses=merge({200: {"description": "Usage and the retention plan."}}, AUTHED))
async def storage(request: Request, _key: Read) -> Response:
    state = request.app.state

    def run() -> Response:
        with state.engine.connect() as conn:
            usage = retention.disk_usage(conn, state.settings)
            items = retention.plan(conn, state.settings)
        return JSONResp({**usage, "retention_plan": [vars(i) for i in items],
                         "reclaimable_bytes": sum(i.bytes for i in items)})

    return await run_in_threadpool(run)


@router.post("/v1/storage/cleanup", summary="Apply the retention policy now",
             response_model=None,
             responses=merge({200: {"description": "What was (or would be) removed."}},
                             AUTHED, E422))
async def cleanup(request: Request, key: Admin, body: CleanupIn | None = None) -> Response:
    state = request.app.state
    dry_run = (body or CleanupIn()).dry_run

    def run() -> Response:
        return JSONResp(retention.apply(state.engine, state.settings, dry_run=dry_run,
                                        actor=registry.Actor.key(key.id)).as_dict())

    return await run_in_threadpool(run)


@router.get("/v1/notifications", summary="Webhook deliveries, newest first",
            response_model=None,
            responses=merge({200: {"description": "Notifications."}}, AUTHED, E422))
async def notifications(
    request: Request, _key: Read,
    status: Annotated[Literal["pending", "sent", "failed"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    engine = request.app.state.engine

    def run() -> Response:
        with engine.connect() as conn:
            return JSONResp({"notifications": list_notifications(conn, status, limit)})

    return await run_in_threadpool(run)
