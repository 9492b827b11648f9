"""The training-job state machine, in SQL: Postgres decides, the broker only delivers.

    queued ──claim──▶ running ──▶ succeeded | failed | cancelled
     ▲ ▲                 │                       │         │
     │ └── reconciler ───┘                       └────┬────┘
     │  (heartbeat stopped; attempt < max_attempts)   │
     └── retry (an operator: service/job_retry.py) ───┘

* At most one active (queued or running) job per model line: a partial unique index, so it
  holds across any number of API and beat processes.
* A run starts only by claiming the row with a conditional UPDATE that sets a fresh attempt
  token: a redelivered or duplicated message finds nothing to claim and does nothing.
* Every later write of the run names that token; after a re-queue the old attempt's writes
  match no row (fencing).
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, and_, case, func, null, select, update
from sqlalchemy.exc import IntegrityError

from service.balance import compute_weights
from service.db import dialect_insert, newest_first
from service.errors import ApiError
from service.freeze import IngestionInFlight, frozen_max_event_id
from service.job_schemas import JobFilters, JobParams
from service.lines import get_line
from service.models import ACTIVE_JOB_STATUSES
from service.models import job_metrics as jm
from service.models import reference_snapshots as rs
from service.models import training_jobs as tj
from service.queries import Filters, line_scope
from service.references import latest_ready
from service.selection import Selection, count_selection, max_event_id
from service.settings import Settings

ERROR_LIMIT = 8000
#: The retraining check's wait after consecutive failed jobs grows no longer than this.
RETRAIN_BACKOFF_CAP_S = 86400.0

log = logging.getLogger("prospect.jobs")


class JobRefused(ApiError):
    """409: the data cannot train (the balancer's reason) or the line is busy."""

    def __init__(self, error: str, message: str, field: str, extra: dict[str, Any] | None = None
                 ) -> None:
        super().__init__(409, error, message, [{"field": field, "message": message}])
        self.extra = extra or {}


@dataclass(frozen=True)
class Claim:
    job_id: int
    token: str
    attempt: int


def _now() -> datetime:
    return datetime.now(UTC)


def selection_for(job: dict[str, Any], settings: Settings) -> Selection:
    """The frozen training selection of a job row (same on every attempt): its trainer, its
    gate's held-out split and erasure lineage all read these rows. ``filters.feedback`` is
    the line's scope when the job was created (absent on older jobs: every event)."""
    f = job["filters"]
    data = job["data"]
    served = f.get("feedback") == "served"
    filters = Filters(
        since=_dt(f.get("since")), until=_dt(f.get("until")),
        model_version=f.get("model_version"), source=f.get("source"),
        min_id=job["min_event_id"], max_id=job["max_event_id"],
        served_by=job["line"] if served else None,
        max_checkpoint_id=f.get("max_checkpoint_id") if served else None)
    return Selection(filters, holdout_fraction=data["holdout_fraction"],
                     max_events_per_user=data["max_events_per_user"] or None)


def scope_json(line: dict[str, Any], scope: Filters) -> dict[str, Any]:
    """What a job row's ``filters`` keep of the scope, for :func:`selection_for`."""
    out: dict[str, Any] = {"feedback": line["feedback"]}
    if scope.served_by is not None:
        out["max_checkpoint_id"] = scope.max_checkpoint_id
    return out


def _dt(v: Any) -> datetime | None:
    if v is None or isinstance(v, datetime):
        return v
    return datetime.fromisoformat(v)


def last_succeeded(conn: Connection, line: str) -> dict[str, Any] | None:
    row = conn.execute(select(tj).where(tj.c.line == line, tj.c.status == "succeeded")
                       .order_by(tj.c.id.desc()).limit(1)).mappings().first()
    return dict(row) if row else None


def active_job(conn: Connection, line: str) -> dict[str, Any] | None:
    row = conn.execute(select(tj).where(tj.c.line == line,
                                        tj.c.status.in_(ACTIVE_JOB_STATUSES))).mappings().first()
    return dict(row) if row else None


def create_job(
    engine: Engine,
    settings: Settings,
    *,
    line: str,
    params: JobParams,
    filters: JobFilters,
    trigger: str = "api",
    requested_by: int | None = None,
) -> dict[str, Any]:
    """Freeze the data, weigh the classes, and insert a queued job; 409 when it cannot train.

    The line's feedback scope is frozen with the data (``filters.feedback``, and with
    ``served`` the newest checkpoint id then): a checkpoint registered later cannot add rows
    to what was counted. The newest id is read before the transaction, once every event at or
    below it has committed or aborted (service.freeze; 503 ``ingestion_in_flight`` when one
    does not end in time): no event can join the range after it was counted."""
    max_id = frozen_max_event_id(engine, settings)
    try:
        with engine.begin() as conn:
            line_row = get_line(conn, line, settings)
            busy = active_job(conn, line)
            if busy is not None:
                raise line_busy(line, busy["id"])
            min_id = 0
            if filters.new_data_only:
                prev = last_succeeded(conn, line)
                min_id = prev["max_event_id"] if prev else 0
            scope = line_scope(conn, line_row, frozen=True)
            cap = settings.max_events_per_user or None
            base = Selection(
                replace(scope, since=filters.since, until=filters.until,
                        model_version=filters.model_version, source=filters.source),
                holdout_fraction=settings.holdout_fraction, max_events_per_user=cap,
            ).frozen(min_id, max_id)
            counts = count_selection(conn, base, corrections=filters.corrections)
            if counts.n_users < settings.min_distinct_users:
                raise JobRefused(
                    "too_few_users",
                    f"the data comes from {counts.n_users} distinct users; at least "
                    f"{settings.min_distinct_users} are required (PROSPECT_MIN_DISTINCT_USERS)",
                    "filters", {"n_users": counts.n_users})
            target = params.target_ratio or settings.target_ratio
            bal = compute_weights(counts.n_desirable, counts.n_undesirable, target,
                                  settings.min_per_class)
            if not bal.allowed:
                raise JobRefused("cannot_train", f"cannot train: {bal.reason}", "filters",
                                 {"n_desirable": counts.n_desirable,
                                  "n_undesirable": counts.n_undesirable})
            lam_d, lam_u = ((params.lambda_d, params.lambda_u) if params.lambda_d is not None
                            else (bal.lambda_d, bal.lambda_u))
            # π_ref must be what the line serves now: a snapshot of an older production (a
            # promotion whose snapshot is still being taken) is not used; the supervisor then
            # snapshots production itself.
            from service.registry import production_source

            ref = latest_ready(conn, line)
            if ref is not None and not _hold_ready(conn, ref["id"]):
                ref = None  # retention removed it meanwhile: the worker takes a new one
            if ref is not None and ref["source"] != production_source(conn, settings, line):
                ref = None
            row = conn.execute(tj.insert().values(
                line=line, status="queued", trigger=trigger, requested_by=requested_by,
                params=params.model_dump(mode="json"),
                filters={**filters.as_json(), **scope_json(line_row, scope)},
                min_event_id=min_id, max_event_id=max_id,
                n_desirable=counts.n_desirable, n_undesirable=counts.n_undesirable,
                n_users=counts.n_users, lambda_d=float(lam_d), lambda_u=float(lam_u),
                data={"holdout_fraction": settings.holdout_fraction,
                      "max_events_per_user": cap or 0, "n_capped": counts.n_capped,
                      "target_ratio": target, "natural_ratio": bal.natural_ratio,
                      "lambda_source": "explicit" if params.lambda_d is not None else "balancer"},
                reference_snapshot_id=ref["id"] if ref else None,
                max_attempts=settings.job_max_attempts, created_at=_now(),
            ).returning(*tj.c)).mappings().one()
            return dict(row)
    except IntegrityError:
        # The partial unique index: another process queued a job for this line meanwhile.
        with engine.connect() as conn:
            busy = active_job(conn, line)
        if busy is None:  # another constraint: the π_ref snapshot picked was deleted meanwhile
            raise JobRefused("conflict", f"line {line!r} changed while the job was created; retry",
                             "line", {}) from None
        raise line_busy(line, busy["id"]) from None


def _hold_ready(conn: Connection, snapshot_id: int) -> bool:
    """Share-lock the π_ref row until the job row commits, and say whether it is still ready.
    Retention locks the row before deciding a snapshot is unneeded, so it either sees this
    job (and keeps the files) or deleted it first (seen here after the wait)."""
    status = conn.execute(select(rs.c.status).where(rs.c.id == snapshot_id)
                          .with_for_update(read=True)).scalar_one_or_none()
    return status == "ready"


def line_busy(line: str, job_id: int | None) -> JobRefused:
    return JobRefused("line_busy",
                      f"line {line!r} already has an active job ({job_id}); one job per line "
                      "runs at a time", "line", {"active_job_id": job_id})


def mark_enqueued(engine: Engine, job_id: int) -> None:
    with engine.begin() as conn:
        conn.execute(update(tj).where(tj.c.id == job_id, tj.c.status == "queued")
                     .values(enqueued_at=_now()))


def get_job(conn: Connection, job_id: int) -> dict[str, Any]:
    row = conn.execute(select(tj).where(tj.c.id == job_id)).mappings().first()
    if row is None:
        raise ApiError(404, "not_found", f"job {job_id} does not exist",
                       [{"field": "job_id", "message": "no such job"}])
    return dict(row)


def list_jobs(conn: Connection, *, status: str | None, line: str | None, limit: int,
              before_id: int | None) -> list[dict[str, Any]]:
    return newest_first(conn, tj, limit=limit, before_id=before_id, status=status, line=line)


def job_metrics(conn: Connection, job_id: int, after_step: int, limit: int
                ) -> list[dict[str, Any]]:
    stmt = (select(jm.c.step, jm.c.attempt, jm.c.metrics, jm.c.created_at)
            .where(jm.c.job_id == job_id, jm.c.step > after_step)
            .order_by(jm.c.step).limit(limit))
    return [dict(r) for r in conn.execute(stmt).mappings()]


def request_cancel(engine: Engine, job_id: int) -> dict[str, Any]:
    """A queued job is cancelled at once (it will never start); a running one is flagged and
    its supervisor and trainer stop it within a step. 409 for a finished job."""
    with engine.begin() as conn:
        now = _now()
        done = conn.execute(update(tj).where(tj.c.id == job_id, tj.c.status == "queued")
                            .values(status="cancelled", cancel_requested=True, finished_at=now,
                                    error="cancelled before it started")).rowcount
        if not done:
            conn.execute(update(tj).where(tj.c.id == job_id, tj.c.status == "running")
                         .values(cancel_requested=True))
        job = get_job(conn, job_id)
    if job["status"] not in ("cancelled", "running"):
        raise ApiError(409, "job_finished", f"job {job_id} already {job['status']}",
                       [{"field": "job_id", "message": f"job is {job['status']}"}])
    return job


# ---- the worker side: claim, heartbeat, progress, finish (all fenced by the token)

def job_output_dir(settings: Settings, line: str, job_id: int) -> str:
    return str(Path(settings.artifacts_root).expanduser().resolve() / "jobs" / line / str(job_id))


def claim(engine: Engine, job_id: int, host: str, settings: Settings) -> Claim | None:
    """Take a queued job for this attempt; None when it is not claimable (already running,
    finished, cancelled, out of attempts): the message that asked is then a no-op."""
    token = secrets.token_hex(16)
    with engine.begin() as conn:
        row = conn.execute(select(tj.c.line, tj.c.attempt).where(tj.c.id == job_id)).first()
        if row is None:
            return None
        now = _now()
        res = conn.execute(
            update(tj).where(tj.c.id == job_id, tj.c.status == "queued",
                             tj.c.cancel_requested.is_(False),
                             tj.c.attempt < tj.c.max_attempts)
            .values(status="running", attempt=tj.c.attempt + 1, attempt_token=token,
                    worker_host=host[:256], heartbeat_at=now,
                    started_at=func.coalesce(tj.c.started_at, now),
                    output_dir=job_output_dir(settings, row.line, job_id))
        )
        if res.rowcount != 1:
            # A queued row whose cancel was asked (by a reconciler of an older version that
            # re-queued it anyway) ends here instead of waiting forever.
            conn.execute(update(tj).where(tj.c.id == job_id, tj.c.status == "queued",
                                          tj.c.cancel_requested.is_(True))
                         .values(status="cancelled", finished_at=now, attempt_token=None,
                                 error="cancelled before it started"))
            return None
        attempt = conn.execute(select(tj.c.attempt).where(tj.c.id == job_id)).scalar_one()
    return Claim(job_id, token, attempt)


def _fenced(claim_: Claim) -> Any:
    return and_(tj.c.id == claim_.job_id, tj.c.attempt_token == claim_.token,
                tj.c.status == "running")


def heartbeat(engine: Engine, claim_: Claim) -> bool:
    """False when another attempt owns the job (re-queued, or failed by the reconciler).
    A row this attempt already finished still answers True: its child is just exiting."""
    with engine.begin() as conn:
        if conn.execute(update(tj).where(_fenced(claim_)).values(heartbeat_at=_now())
                        ).rowcount == 1:
            return True
        token = conn.execute(select(tj.c.attempt_token).where(tj.c.id == claim_.job_id)
                             ).scalar_one_or_none()
        return token == claim_.token


def cancel_requested(engine: Engine, job_id: int) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(select(tj.c.cancel_requested).where(tj.c.id == job_id)
                                 ).scalar_one_or_none())


def set_reference(engine: Engine, claim_: Claim, snapshot_id: int) -> bool:
    with engine.begin() as conn:
        return conn.execute(update(tj).where(_fenced(claim_))
                            .values(reference_snapshot_id=snapshot_id)).rowcount == 1


def json_safe(value: Any) -> Any:
    """NaN and ±inf as null: JSON has none of them and Postgres refuses the whole write (a
    diverging run logs loss NaN or grad_norm inf), where SQLite would store them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def record_progress(engine: Engine, claim_: Claim, rows: list[dict[str, Any]],
                    total_steps: int | None = None, data: dict[str, Any] | None = None) -> bool:
    """Write step metrics and progress in one transaction, only while this attempt owns the
    job. A resumed attempt redoes steps after its checkpoint: their rows are replaced."""
    with engine.begin() as conn:
        values: dict[str, Any] = {"heartbeat_at": _now()}
        if rows:
            values["step"] = max(int(r["step"]) for r in rows)
        if total_steps is not None:
            values["total_steps"] = total_steps
        if data is not None:
            values["data"] = data
        if conn.execute(update(tj).where(_fenced(claim_)).values(**values)).rowcount != 1:
            return False
        if rows:
            stmt = dialect_insert(conn, jm)
            stmt = stmt.on_conflict_do_update(
                index_elements=["job_id", "step"],
                set_={"attempt": stmt.excluded.attempt, "metrics": stmt.excluded.metrics,
                      "created_at": stmt.excluded.created_at})
            now = _now()
            conn.execute(stmt, [{"job_id": claim_.job_id, "step": int(r["step"]),
                                 "attempt": claim_.attempt, "metrics": json_safe(r),
                                 "created_at": now}
                                for r in rows])
        return True


#: The error of a run that completed after its cancel was accepted.
CANCELLED_AT_THE_END = ("cancelled by request after the last step: the model in final/ is not "
                        "registered or evaluated")


def finish(engine: Engine, claim_: Claim, status: str, *, result: dict[str, Any] | None = None,
           error: str | None = None) -> bool:
    """Settle the attempt's row. A success whose cancel was accepted meanwhile (after the
    trainer's last check) ends ``cancelled``: the API answered that cancel with 202, so the
    model must not reach the gate. One UPDATE reads the flag and writes the status, so a
    cancel committing in between cannot be lost (Postgres re-reads the row it waited for).
    True when this attempt still owned the row."""
    assert status in ("succeeded", "failed", "cancelled")
    values: dict[str, Any] = {"result": json_safe(result), "finished_at": _now(),
                              "heartbeat_at": _now()}
    if status == "succeeded":
        asked = tj.c.cancel_requested.is_(True)
        values.update(status=case((asked, "cancelled"), else_="succeeded"),
                      error=case((asked, CANCELLED_AT_THE_END), else_=null()))
    else:
        values.update(status=status, error=error[-ERROR_LIMIT:] if error else None)
    with engine.begin() as conn:
        return conn.execute(update(tj).where(_fenced(claim_)).values(**values)).rowcount == 1


# ---- the reconciler (beat): lost workers and lost messages

@dataclass
class ReconcileReport:
    #: Jobs to send to the broker (re-queued after a lost worker, or queued but unsent).
    to_send: list[int]
    requeued: list[int]
    failed: list[int]
    cancelled: list[int]


def reconcile(engine: Engine, settings: Settings, now: datetime | None = None) -> ReconcileReport:
    now = now or _now()
    stale_before = now - timedelta(seconds=settings.heartbeat_timeout_s)
    resend_before = now - timedelta(seconds=settings.requeue_after_s)
    report = ReconcileReport([], [], [], [])
    with engine.begin() as conn:
        stale = conn.execute(select(tj.c.id, tj.c.attempt, tj.c.max_attempts, tj.c.attempt_token,
                                    tj.c.cancel_requested, tj.c.heartbeat_at)
                             .where(tj.c.status == "running",
                                    tj.c.heartbeat_at < stale_before)).all()
    for job in stale:
        lost = f"worker lost: no heartbeat since {job.heartbeat_at.isoformat()}"
        guard = and_(tj.c.id == job.id, tj.c.status == "running",
                     tj.c.attempt_token == job.attempt_token, tj.c.heartbeat_at < stale_before)
        # cancel_requested is read again in each UPDATE: a cancel that lands after the SELECT
        # above must not be re-queued (claim() never takes a cancelled-queued row).
        with engine.begin() as conn:
            if conn.execute(update(tj).where(guard, tj.c.cancel_requested.is_(True)).values(
                    status="cancelled", finished_at=now, error=lost, attempt_token=None)).rowcount:
                report.cancelled.append(job.id)
            elif job.attempt >= job.max_attempts:
                if conn.execute(update(tj).where(guard, tj.c.cancel_requested.is_(False)).values(
                        status="failed", finished_at=now, attempt_token=None,
                        error=f"{lost}; gave up after {job.attempt} attempts")).rowcount:
                    report.failed.append(job.id)
            elif conn.execute(update(tj).where(guard, tj.c.cancel_requested.is_(False)).values(
                    status="queued", attempt_token=None, worker_host=None, enqueued_at=now,
                    error=f"{lost}; re-queued after attempt {job.attempt}")).rowcount:
                report.requeued.append(job.id)
                report.to_send.append(job.id)
    with engine.begin() as conn:
        unsent = conn.execute(select(tj.c.id, tj.c.enqueued_at).where(
            tj.c.status == "queued",
            (tj.c.enqueued_at.is_(None)) | (tj.c.enqueued_at < resend_before))).all()
        for job in unsent:
            same = (tj.c.enqueued_at.is_(None) if job.enqueued_at is None
                    else tj.c.enqueued_at == job.enqueued_at)
            if conn.execute(update(tj).where(tj.c.id == job.id, tj.c.status == "queued", same)
                            .values(enqueued_at=now)).rowcount:
                report.to_send.append(job.id)
    return report


# ---- scheduled retraining

@dataclass
class RetrainDecision:
    line: str
    job_id: int | None
    reason: str


def failure_streak(conn: Connection, line: str) -> tuple[int, datetime | None]:
    """The line's failed jobs since its last succeeded one, and when the newest of them
    finished. Cancelled jobs are skipped: an operator's decision, not a failure. In the order
    they finished, not by id: a retried older job that succeeds ends the streak."""
    ended = func.coalesce(tj.c.finished_at, tj.c.created_at)
    rows = conn.execute(select(tj.c.status, tj.c.finished_at, tj.c.created_at)
                        .where(tj.c.line == line, tj.c.status.in_(("succeeded", "failed")))
                        .order_by(ended.desc(), tj.c.id.desc()).limit(64)).all()
    n, last = 0, None
    for r in rows:
        if r.status != "failed":
            break
        n += 1
        last = last or r.finished_at or r.created_at
    return n, last


def retrain_backoff_until(settings: Settings, failures: int, last_failed: datetime | None
                          ) -> datetime | None:
    """When the check may queue again after ``failures`` consecutive failed jobs:
    PROSPECT_RETRAIN_FAILURE_BACKOFF_S doubled per failure after the first, at most a day."""
    if not failures or last_failed is None or settings.retrain_failure_backoff_s <= 0:
        return None
    wait = min(settings.retrain_failure_backoff_s * 2.0 ** min(failures - 1, 32),
               RETRAIN_BACKOFF_CAP_S)
    return last_failed + timedelta(seconds=wait)


def check_retraining(engine: Engine, settings: Settings, line: str) -> RetrainDecision:
    """Queue a job when enough new feedback of this line (its feedback scope) arrived since
    the line's last successful job.
    Safe under concurrent callers: the active-job index lets exactly one insert win. After
    failed jobs it waits (growing with each consecutive failure): new data is counted from the
    last *successful* job, so a line whose jobs keep failing would otherwise queue one at every
    check and burn a GPU forever."""
    with engine.connect() as conn:
        line_row = get_line(conn, line, settings)
        conn.commit()
        busy = active_job(conn, line)
        if busy is not None:
            return RetrainDecision(line, None, f"job {busy['id']} is active")
        failures, last_failed = failure_streak(conn, line)
        until = retrain_backoff_until(settings, failures, last_failed)
        if until is not None and _now() < until:
            reason = (f"{failures} consecutive failed job(s); not queuing another before "
                      f"{until.isoformat(timespec='seconds')} (PROSPECT_RETRAIN_FAILURE_BACKOFF_S)")
            log.info("line %s: %s", line, reason)
            return RetrainDecision(line, None, reason)
        prev = last_succeeded(conn, line)
        min_id = prev["max_event_id"] if prev else 0
        # Not frozen (service.freeze): an event still in flight is only counted at the next
        # check; create_job freezes and counts again before anything is trained.
        sel = Selection(line_scope(conn, line_row), settings.holdout_fraction,
                        settings.max_events_per_user or None).frozen(min_id, max_event_id(conn))
        c = count_selection(conn, sel)
    new = c.n_desirable + c.n_undesirable
    if new < settings.retrain_min_events:
        return RetrainDecision(line, None, f"{new} new events; {settings.retrain_min_events} "
                               "needed (PROSPECT_RETRAIN_MIN_EVENTS)")
    if min(c.n_desirable, c.n_undesirable) < settings.min_per_class:
        return RetrainDecision(line, None, f"new events {c.n_desirable} desirable / "
                               f"{c.n_undesirable} undesirable; {settings.min_per_class} of "
                               "each needed")
    try:
        job = create_job(engine, settings, line=line,
                         params=JobParams(**settings.default_job_params),
                         filters=JobFilters(new_data_only=True), trigger="schedule")
    except (JobRefused, IngestionInFlight) as exc:
        return RetrainDecision(line, None, exc.message)
    return RetrainDecision(line, job["id"], f"{new} new events")


def ids_digest(ids: list[int]) -> str:
    """sha256 over the trained event ids: the data's fingerprint in the job's lineage."""
    h = hashlib.sha256()
    for i in ids:
        h.update(f"{i}\n".encode())
    return h.hexdigest()
