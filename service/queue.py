"""The Celery application's configuration, and sending work to it.

It lives in ``service`` (no torch, no task code) so the API can enqueue a job with the same
settings the workers use; ``worker/celery_app.py`` adds the tasks and the beat schedule.
Tasks are addressed by name, so the API never imports worker code.

Settings follow "Celery GPU workers" in ARCHITECTURE.md: late acks and prefetch 1 (a worker
takes one job at a time), no result backend (Postgres holds job state), and the same
visibility timeout everywhere Redis reads it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Queue
from sqlalchemy.engine import make_url

from service.settings import Settings

log = logging.getLogger("prospect.queue")

TRAIN_TASK = "prospect.train"
SNAPSHOT_TASK = "prospect.snapshot_reference"
RECONCILE_TASK = "prospect.reconcile"
RETRAIN_CHECK_TASK = "prospect.check_retraining"
PERIODIC_SNAPSHOT_TASK = "prospect.periodic_snapshot"
# registry (worker/gate.py, service/live.py, service/retention.py, service/notify.py)
EVALUATE_TASK = "prospect.evaluate_job"
GATE_SWEEP_TASK = "prospect.gate_sweep"
GUARD_TASK = "prospect.canary_guard"
RETENTION_TASK = "prospect.retention"
NOTIFY_TASK = "prospect.deliver_notifications"

GPU_QUEUE = "gpu"
DEFAULT_QUEUE = "default"


def _ensure_sqla_dir(url: str) -> None:
    """kombu's SQLAlchemy transport does not create the SQLite file's folder."""
    if url.startswith("sqla+sqlite"):
        database = make_url(url.removeprefix("sqla+")).database
        if database:
            Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)


def celery_config(settings: Settings) -> dict[str, Any]:
    transport: dict[str, Any] = {}
    if settings.broker_url.startswith(("redis", "rediss")):
        transport["visibility_timeout"] = settings.broker_visibility_timeout_s
        if settings.broker_key_prefix:
            transport["global_keyprefix"] = settings.broker_key_prefix
    _ensure_sqla_dir(settings.broker_url)
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport,
        "result_backend": None,
        "result_backend_transport_options": transport,
        "visibility_timeout": settings.broker_visibility_timeout_s,
        "task_ignore_result": True,
        "task_acks_late": True,
        # A worker killed mid-task acknowledges nothing more: the reconciler, not the broker,
        # decides whether the job runs again (retry count on the row, no redelivery loop).
        "task_reject_on_worker_lost": False,
        "worker_prefetch_multiplier": 1,
        "task_queues": (Queue(GPU_QUEUE), Queue(DEFAULT_QUEUE)),
        "task_default_queue": DEFAULT_QUEUE,
        "task_routes": {TRAIN_TASK: {"queue": GPU_QUEUE}, EVALUATE_TASK: {"queue": GPU_QUEUE}},
        "broker_connection_retry_on_startup": True,
        # Sending must not hang an API request when the broker is down: fail fast, the job
        # row stays queued and the reconciler sends it later.
        "broker_connection_timeout": 3,
        "broker_connection_max_retries": 1,
        "task_publish_retry": False,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "enable_utc": True,
        "timezone": "UTC",
    }


def make_celery(settings: Settings, name: str = "prospect") -> Celery:
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


def send(app: Celery, task: str, args: list[Any], queue: str | None = None) -> bool:
    """Send a task by name; False (logged) when the broker cannot take it right now."""
    try:
        app.send_task(task, args=args, queue=queue, retry=False)
        return True
    except Exception as exc:  # noqa: BLE001 - any broker failure means "not sent"
        log.warning("could not send %s to the broker: %s", task, exc)
        return False
