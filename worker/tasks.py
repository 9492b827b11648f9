"""Thin Celery tasks: each reads settings, calls a service or worker function, and logs.

No task is retried by Celery: a job's attempts are counted on its row and the reconciler
re-queues, so a crash can neither lose a job nor loop on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import Engine

from service import jobs
from service.db import make_engine
from service.erasure import FEEDBACK_RETENTION_TASK
from service.lines import list_lines
from service.queue import (
    DEFAULT_QUEUE,
    EVALUATE_TASK,
    GATE_SWEEP_TASK,
    GPU_QUEUE,
    GUARD_TASK,
    NOTIFY_TASK,
    PERIODIC_SNAPSHOT_TASK,
    RECONCILE_TASK,
    RETENTION_TASK,
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
T = TypeVar("T")


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
    outcome = supervise(int(job_id), _settings(), _engine())
    if outcome == "succeeded":
        enqueue_evaluation(int(job_id))
    return outcome


# ---- registry: the evaluation gate, the canary guard, retention, notifications

def enqueue_evaluation(job_id: int) -> bool:
    """Register the job's model as pending and send its evaluation; when the broker is down
    the gate sweep sends it later."""
    from service import registry

    row = registry.ensure_pending(_engine(), _settings(), job_id)
    if row is None or row["stage"] != "pending":
        return False
    if send(app, EVALUATE_TASK, [job_id], queue=GPU_QUEUE):
        registry.mark_gate_sent(_engine(), row["id"])
        return True
    return False


@app.task(name=EVALUATE_TASK)
def evaluate_job(job_id: int) -> str:
    from worker.gate import run_gate

    outcome = run_gate(_engine(), _settings(), int(job_id))
    _kick_notifications()
    return outcome


def _kick_notifications() -> None:
    if _settings().webhook_url:
        send(app, NOTIFY_TASK, [], queue=DEFAULT_QUEUE)


def _send_snapshot(snapshot_id: int | None) -> None:
    if snapshot_id is not None:
        send(app, SNAPSHOT_TASK, [snapshot_id], queue=DEFAULT_QUEUE)


@app.task(name=GATE_SWEEP_TASK)
def gate_sweep() -> dict[str, Any]:
    from service import notify, registry

    engine, settings = _engine(), _settings()
    report = registry.gate_sweep(engine, settings)
    for job_id in report.to_send:
        send(app, EVALUATE_TASK, [job_id], queue=GPU_QUEUE)
    for snap_id in report.snapshots:
        _send_snapshot(snap_id)
    if report.snapshots_failed:
        log.warning("gate sweep: gave up on π_ref snapshots %s", report.snapshots_failed)
    notify.enqueue_job_failures(engine, settings)
    _kick_notifications()
    return asdict(report)


@app.task(name=GUARD_TASK)
def canary_guard() -> list[dict[str, Any]]:
    from service.live import guard_tick

    actions = guard_tick(_engine(), _settings())
    for a in actions:
        _send_snapshot(a.snapshot_id)
    if any(a.action != "none" for a in actions):
        _kick_notifications()
    return [asdict(a) for a in actions]


@app.task(name=RETENTION_TASK)
def retention() -> dict[str, Any]:
    """Artifact retention, then the webhook outbox's settled rows past
    PROSPECT_WEBHOOK_KEEP_DAYS (``notifications_pruned``)."""
    from service.notify import prune
    from service.retention import apply

    engine, settings = _engine(), _settings()
    try:
        report = apply(engine, settings).as_dict()
    finally:  # a folder that cannot be removed must not keep the outbox growing
        pruned = prune(engine, settings)
    return {**report, "notifications_pruned": pruned}


@app.task(name=FEEDBACK_RETENTION_TASK)
def feedback_retention() -> dict[str, Any]:
    """Delete events past PROSPECT_FEEDBACK_RETENTION_DAYS, recording the jobs that had
    them (GET /v1/lineage/erased)."""
    from service.erasure import apply_retention

    result = apply_retention(_engine(), _settings())
    return result.as_dict() if result is not None else {"disabled": True}


@app.task(name=NOTIFY_TASK)
def deliver_notifications() -> dict[str, Any]:
    """Queue recent job failures, then post what is due. Queued here too, not only by the gate
    sweep: beat runs this task whenever a webhook is set, the sweep may be off."""
    from service.notify import deliver_pending, enqueue_job_failures

    engine, settings = _engine(), _settings()
    enqueue_job_failures(engine, settings)
    return asdict(deliver_pending(engine, settings))


@app.task(name=SNAPSHOT_TASK)
def snapshot_reference(snapshot_id: int) -> dict[str, Any]:
    snap = take_snapshot(_engine(), _settings(), int(snapshot_id))
    return {"id": snap["id"], "status": snap["status"]}


def _each_line(what: str, fn: Callable[[str], T]) -> dict[str, Any]:
    """Run ``fn`` for every model line on its own: one line's error (a base model folder that
    is gone, a database error) is logged with the line's name and the lines after it still
    run. ``{"lines": {line: result}, "failed": {line: error}}``."""
    engine, settings = _engine(), _settings()
    with engine.begin() as conn:
        lines = [str(line["name"]) for line in list_lines(conn, settings)]
    done: dict[str, T] = {}
    failed: dict[str, str] = {}
    for line in lines:
        try:
            done[line] = fn(line)
        except Exception as exc:  # noqa: BLE001 - isolate the line; the next ones still run
            log.exception("%s: line %s failed", what, line)
            failed[line] = f"{type(exc).__name__}: {exc}"[:1000]
    return {"lines": done, "failed": failed}


@app.task(name=PERIODIC_SNAPSHOT_TASK)
def periodic_snapshot() -> dict[str, Any]:
    """Snapshot each line's production model; nothing is written when it did not change."""
    engine, settings = _engine(), _settings()
    return _each_line("periodic snapshot",
                      lambda line: current_reference(engine, settings, line)["id"])


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

    def check(line: str) -> dict[str, Any]:
        decision = jobs.check_retraining(engine, settings, line)
        if decision.job_id is not None:
            enqueue_job(decision.job_id)
            log.info("line %s: queued job %s (%s)", line, decision.job_id, decision.reason)
        return asdict(decision)

    return _each_line("retraining check", check)
