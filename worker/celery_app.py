"""The Celery app the workers and beat run: ``celery -A worker.celery_app worker|beat``
(``prospect worker`` / ``prospect beat`` wrap these).

Run one worker process per GPU on queue ``gpu`` (``--pool=solo``: CUDA does not survive the
prefork pool's fork) and a light worker on ``default`` for snapshots, the reconciler and the
retraining check, so those keep running while a GPU worker trains. Run exactly one beat.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from service.erasure import FEEDBACK_RETENTION_TASK
from service.queue import (
    DEFAULT_QUEUE,
    GATE_SWEEP_TASK,
    GUARD_TASK,
    NOTIFY_TASK,
    PERIODIC_SNAPSHOT_TASK,
    RECONCILE_TASK,
    RETENTION_TASK,
    RETRAIN_CHECK_TASK,
    make_celery,
)
from service.settings import Settings, get_settings


def beat_schedule(settings: Settings) -> dict[str, Any]:
    plan = {
        "reconcile-jobs": (RECONCILE_TASK, settings.reconcile_interval_s),
        "check-retraining": (RETRAIN_CHECK_TASK, settings.retrain_check_interval_s),
        "snapshot-reference": (PERIODIC_SNAPSHOT_TASK, settings.snapshot_interval_s),
        # registry: evaluations never sent or lost, the canary guard, retention, webhooks
        "gate-sweep": (GATE_SWEEP_TASK, settings.gate_sweep_interval_s),
        "canary-guard": (GUARD_TASK, settings.guard_interval_s if settings.guard_enabled else 0),
        "retention": (RETENTION_TASK, settings.retention_interval_s),
        "deliver-notifications": (NOTIFY_TASK,
                                  settings.notify_interval_s if settings.webhook_url else 0),
        # data rights: delete feedback older than PROSPECT_FEEDBACK_RETENTION_DAYS
        "feedback-retention": (FEEDBACK_RETENTION_TASK,
                               settings.feedback_retention_interval_s
                               if settings.feedback_retention_days > 0 else 0),
    }
    return {
        name: {"task": task, "schedule": timedelta(seconds=every),
               "options": {"queue": DEFAULT_QUEUE, "expires": max(1.0, every)}}
        for name, (task, every) in plan.items() if every > 0
    }


app = make_celery(get_settings(), "prospect-worker")
app.conf.include = ["worker.tasks"]
app.conf.beat_schedule = beat_schedule(get_settings())
