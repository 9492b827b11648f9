"""Training jobs over HTTP: start (admin), list, inspect, metrics, cancel and retry (admin).

The row is committed before the message is sent; when the broker is down the job still
answers 202 (``enqueued: false``) and the reconciler sends it once the broker is back.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service import job_retry, jobs
from service.api.common import AUTHED, E422, error_response_doc, id_cursor, id_page, merge
from service.auth import KeyInfo, require
from service.errors import JSONResp
from service.job_schemas import LINE_PATTERN, JobIn, JobOut, JobPage, MetricsPage
from service.queue import GPU_QUEUE, TRAIN_TASK, send

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
Admin = Annotated[KeyInfo, Depends(require("admin"))]
Read = Annotated[KeyInfo, Depends(require("read"))]
JobId = Annotated[int, Path(ge=1, le=2**31 - 1)]
E404 = {404: error_response_doc("No such job.")}
E409 = {409: error_response_doc("The data cannot train (the balancer's reason), the line "
                                "already has an active job, or the job already finished.")}
E503_FREEZE = {503: error_response_doc(
    "Database unavailable, or `ingestion_in_flight`: an ingest transaction holding an event id "
    "below the newest did not end within PROSPECT_FREEZE_WAIT_S, so the data could not be "
    "frozen; retry after `Retry-After` seconds.")}
E409_RETRY = {409: error_response_doc(
    "The job is not failed or cancelled, the line already has an active job, the job has a "
    "checkpoint, or its π_ref snapshot is gone or no longer what the line serves.")}

_PUBLIC = [f for f in JobOut.model_fields]
log = logging.getLogger("prospect.jobs")


def job_out(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in _PUBLIC}


@router.post("", status_code=202, summary="Start a KTO training job", response_model=None,
             responses=merge({202: {"model": JobOut, "description": "Queued."}},
                             AUTHED, E404, E409, E422, E503_FREEZE))
async def create(request: Request, body: JobIn, key: Admin) -> Response:
    state = request.app.state

    def run() -> Response:
        row = jobs.create_job(state.engine, state.settings, line=body.line, params=body.params,
                              filters=body.filters, trigger="api", requested_by=key.id)
        sent = enqueue(state, row["id"])
        return JSONResp({**job_out(row), "enqueued": sent}, status_code=202,
                        headers={"Location": f"/v1/jobs/{row['id']}"})

    return await run_in_threadpool(run)


def enqueue(state: Any, job_id: int) -> bool:
    """Send a queued job's task; when the broker is down the reconciler sends it later."""
    sent = send(state.celery, TRAIN_TASK, [job_id], queue=GPU_QUEUE)
    if sent:
        jobs.mark_enqueued(state.engine, job_id)
    return sent


@router.get("", summary="List jobs, newest first", response_model=None,
            responses=merge({200: {"model": JobPage, "description": "A page."}}, AUTHED, E422))
async def list_(
    request: Request, _key: Read,
    status: Annotated[Literal["queued", "running", "succeeded", "failed", "cancelled"] | None,
                      Query()] = None,
    line: Annotated[str | None, Query(pattern=LINE_PATTERN)] = None,
    limit: Annotated[int | None, Query(ge=1)] = None,
    cursor: Annotated[str | None, Query(max_length=32,
                                        description="next_cursor of the previous page")] = None,
) -> Response:
    state = request.app.state
    size = min(limit or state.settings.default_page_size, state.settings.max_page_size)
    before = id_cursor(cursor)

    def run() -> Response:
        with state.engine.connect() as conn:
            rows = jobs.list_jobs(conn, status=status, line=line, limit=size + 1,
                                  before_id=before)
        rows, next_cursor = id_page(rows, size)
        return JSONResp({"jobs": [job_out(r) for r in rows], "next_cursor": next_cursor})

    return await run_in_threadpool(run)


@router.get("/{job_id}", summary="One job", response_model=None,
            responses=merge({200: {"model": JobOut, "description": "The job."}},
                            AUTHED, E404, E422))
async def get(request: Request, job_id: JobId, _key: Read) -> Response:
    engine = request.app.state.engine

    def run() -> Response:
        with engine.connect() as conn:
            return JSONResp(job_out(jobs.get_job(conn, job_id)))

    return await run_in_threadpool(run)


@router.get("/{job_id}/metrics", summary="Per-step training metrics", response_model=None,
            responses=merge({200: {"model": MetricsPage, "description": "Metrics."}},
                            AUTHED, E404, E422))
async def metrics(
    request: Request, job_id: JobId, _key: Read,
    after_step: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Response:
    engine = request.app.state.engine

    def run() -> Response:
        with engine.connect() as conn:
            jobs.get_job(conn, job_id)
            rows = jobs.job_metrics(conn, job_id, after_step, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return JSONResp({"job_id": job_id, "metrics": rows,
                         "next_after_step": rows[-1]["step"] if more and rows else None})

    return await run_in_threadpool(run)


@router.post("/{job_id}/cancel", status_code=202, summary="Cancel a job", response_model=None,
             responses=merge({202: {"model": JobOut, "description": "Cancelled or cancelling."}},
                             AUTHED, E404, E409, E422))
async def cancel(request: Request, job_id: JobId, key: Admin) -> Response:
    engine = request.app.state.engine

    def run() -> Response:
        job = jobs.request_cancel(engine, job_id)
        log.info("job cancel requested", extra={"job_id": job_id, "key_id": key.id,
                                                "outcome": job["status"]})
        return JSONResp(job_out(job), status_code=202)

    return await run_in_threadpool(run)


@router.post("/{job_id}/retry", status_code=202, summary="Retry a failed or cancelled job",
             response_model=None,
             responses=merge({202: {"model": JobOut, "description": "Queued again."}},
                             AUTHED, E404, E409_RETRY, E422))
async def retry(request: Request, job_id: JobId, key: Admin) -> Response:
    """The same job runs again with fresh attempts, resuming from its newest checkpoint if
    its resume states still exist (else from the start); see service/job_retry.py."""
    state = request.app.state

    def run() -> Response:
        row = job_retry.retry_job(state.engine, state.settings, job_id, retried_by=key.id)
        sent = enqueue(state, job_id)
        return JSONResp({**job_out(row), "enqueued": sent}, status_code=202)

    return await run_in_threadpool(run)
