"""Thin Celery tasks: each reads settings, calls a service or worker function, and logs.

No task is retried by Celery: a job's attempts are counted on its row and the reconciler
re-queues, so a crash can neither lose a job nor loop on it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine

from service import jobs
from service.db import make_engine
from service.lines import list_lines
from service.queue import (
    GPU_QUEUE,
    PERIODIC_SNAPSHOT_TASK,
    RECONCILE_TASK,
    RETRAIN_CHECK_TASK,
    SNAPSHOT_TASK,
    TRAIN_TASK,
    send,
)
from service.settings import Settings, get_settings
from worker.celery_app import app
from worker.job_supervisor import supervise
from worker.references import current_reference, take_snapshot

log = logging.getLogger("prospect.tasks")


@lru_cache
def _engine() -> Engine:
    settings = get_settings()
    return make_engine(settings.model_copy(update={"db_application_name": "prospect-worker",
                                                    "db_pool_size": 2}))


def _settings() -> Settings:
    return get_settings()


def enqueue_job(job_id: int) -> bool:
    if send(app, TRAIN_TASK, [job_id], queue=GPU_QUEUE):
        jobs.mark_enqueued(_engine(), job_id)
        return True
    return False


@app.task(name=TRAIN_TASK)
def train(job_id: int) -> str:
    return supervise(int(job_id), _settings(), _engine())


@app.task(name=SNAPSHOT_TASK)
def snapshot_reference(snapshot_id: int) -> dict[str, Any]:
    snap = take_snapshot(_engine(), _settings(), int(snapshot_id))
    return {"id": snap["id"], "status": snap["status"]}


@app.task(name=PERIODIC_SNAPSHOT_TASK)
def periodic_snapshot() -> dict[str, Any]:
    """Snapshot each line's production model; nothing is written when it did not change."""
    engine, settings = _engine(), _settings()
    with engine.begin() as conn:
        lines = [str(line["name"]) for line in list_lines(conn, settings)]
    return {line: current_reference(engine, settings, line)["id"] for line in lines}


@app.task(name=RECONCILE_TASK)
def reconcile() -> dict[str, Any]:
    report = jobs.reconcile(_engine(), _settings())
    for job_id in report.to_send:
        enqueue_job(job_id)
    if report.requeued or report.failed or report.cancelled:
        log.warning("reconciler: %s", report)
    return asdict(report)


@app.task(name=RETRAIN_CHECK_TASK)
def check_retraining() -> dict[str, Any]:
    engine, settings = _engine(), _settings()
    with engine.begin() as conn:
        lines = [str(line["name"]) for line in list_lines(conn, settings)]
    out = {}
    for line in lines:
        decision = jobs.check_retraining(engine, settings, line)
        if decision.job_id is not None:
            enqueue_job(decision.job_id)
            log.info("line %s: queued job %s (%s)", line, decision.job_id, decision.reason)
        out[line] = asdict(decision)
    return out
