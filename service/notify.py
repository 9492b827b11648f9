"""Webhook notifications: job failure, gate decisions, rejections by hand, promotions, rollbacks.

An outbox, not a fire-and-forget POST: the notification row is written in the same
transaction as the change it reports, and a beat task (``deliver_pending``) posts it with
retries and exponential backoff. So a receiver that is down, a broker that is down, or a
process that dies right after a promotion loses nothing, and a change that rolled back is
never announced. Each fact has a ``dedup_key`` (unique), so a sweep that runs twice does
not announce it twice; receivers get ``X-Prospect-Delivery`` to drop a retried duplicate.

Nothing is written when ``PROSPECT_WEBHOOK_URL`` is unset. Delivered and given-up rows are
deleted ``PROSPECT_WEBHOOK_KEEP_DAYS`` after their last attempt (:func:`prune`, run by the
retention beat task); pending rows stay until they are delivered or given up.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import secrets
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, delete, select, update

from service.db import dialect_insert
from service.models import notifications as nt
from service.models import training_jobs as tj
from service.settings import JOB_FAILURE_LOOKBACK_DAYS, Settings

log = logging.getLogger("prospect.notify")

EVENTS = ("job_failed", "gate_passed", "gate_rejected", "rejected", "canary_started",
          "promoted", "rolled_back", "guard_inconclusive")
#: While one sweeper posts a row, others leave it alone for this long.
_LEASE = timedelta(seconds=60)
_ERROR_LIMIT = 2000
#: Rows deleted per transaction by :func:`prune`.
PRUNE_BATCH = 1000


def _now() -> datetime:
    return datetime.now(UTC)


def enqueue(conn: Connection, settings: Settings, event: str, payload: dict[str, Any],
            dedup_key: str | None = None) -> bool:
    """Add a notification in the caller's transaction; False when webhooks are off or the
    same fact was already queued."""
    if not settings.webhook_url:
        return False
    assert event in EVENTS, event
    now = _now()
    stmt = dialect_insert(conn, nt).values(
        dedup_key=dedup_key or f"{event}:{secrets.token_hex(8)}", event=event,
        payload={"event": event, **payload, "at": now.isoformat()}, status="pending",
        attempts=0, next_attempt_at=now, created_at=now,
    ).on_conflict_do_nothing(index_elements=["dedup_key"]).returning(nt.c.id)
    return conn.execute(stmt).scalar_one_or_none() is not None


def enqueue_job_failures(engine: Engine, settings: Settings,
                         lookback_s: float = JOB_FAILURE_LOOKBACK_DAYS * 86_400.0) -> int:
    """Queue ``job_failed`` for jobs that failed recently (service.jobs writes the failure;
    this sweep announces it once: its outbox row, kept longer than the lookback, is the
    record)."""
    if not settings.webhook_url:
        return 0
    since = _now() - timedelta(seconds=lookback_s)
    n = 0
    with engine.begin() as conn:
        rows = conn.execute(select(tj.c.id, tj.c.line, tj.c.error, tj.c.attempt,
                                   tj.c.finished_at, tj.c.retries)
                            .where(tj.c.status == "failed", tj.c.finished_at >= since)).all()
        for r in rows:
            # a retried job that fails again is a new fact (POST /v1/jobs/{id}/retry)
            n += enqueue(conn, settings, "job_failed", {
                "line": r.line, "job_id": r.id, "attempt": r.attempt, "retries": r.retries,
                "reason": (r.error or "")[-_ERROR_LIMIT:],
                "finished_at": r.finished_at.isoformat() if r.finished_at else None,
            }, dedup_key=f"job_failed:{r.id}" + (f":retry-{r.retries}" if r.retries else ""))
    return n


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib follows a 301/302/303 to a POST with a body-less GET, whose 200 would mark the
    notification sent though its body never arrived; a redirect is a failed attempt
    (``HTTP 3xx``) instead, and the signed headers go nowhere else."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _post(settings: Settings, row: Any) -> tuple[bool, str | None]:
    """POST the row within ``webhook_timeout_s`` in all. urllib's timeout bounds each socket
    read, so a receiver trickling its answer a byte at a time would hold the deliverer (past
    the row's lease) for as long as it liked; the request runs in a daemon thread that is
    abandoned at the deadline (it ends at urllib's next per-read timeout or answer)."""
    result: list[tuple[bool, str | None]] = []

    def attempt() -> None:
        try:
            result.append(_post_once(settings, row))
        except Exception as exc:  # noqa: BLE001 - any other failure is a failed attempt, named
            result.append((False, f"{type(exc).__name__}: {exc}"))

    worker = threading.Thread(target=attempt, name="prospect-webhook", daemon=True)
    worker.start()
    worker.join(settings.webhook_timeout_s)
    if not result:
        return False, f"TimeoutError: no complete answer within {settings.webhook_timeout_s} s"
    return result[0]


def _post_once(settings: Settings, row: Any) -> tuple[bool, str | None]:
    body = json.dumps({"delivery_id": row.dedup_key, **row.payload}, sort_keys=True,
                      default=str).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "prospect-webhook/1",
               "X-Prospect-Event": row.event, "X-Prospect-Delivery": row.dedup_key}
    if settings.webhook_secret:
        headers["X-Prospect-Signature"] = sign(settings.webhook_secret, body)
    req = urllib.request.Request(str(settings.webhook_url), data=body, headers=headers,
                                 method="POST")
    try:
        with _opener.open(req, timeout=settings.webhook_timeout_s) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    # refused, timeout, DNS, bad URL; HTTPException: a non-HTTP answer (BadStatusLine, ...)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return (200 <= status < 300), None if 200 <= status < 300 else f"HTTP {status}"


@dataclass
class DeliveryReport:
    sent: list[int] = field(default_factory=list)
    retrying: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)


def deliver_pending(engine: Engine, settings: Settings, limit: int = 100,
                    now: datetime | None = None) -> DeliveryReport:
    """Post every due notification once; reschedule failures with exponential backoff and
    give up after ``webhook_max_attempts``. Safe to run from several processes: a row is
    leased with a conditional UPDATE before it is posted. Leases and retry times count from
    the moment they are taken (``now`` plus the time this sweep has run), not from the sweep's
    start: posts that time out one after another would otherwise leave the later rows with
    expired leases and backoffs already over."""
    report = DeliveryReport()
    if not settings.webhook_url:
        return report
    now = now or _now()
    started = time.monotonic()

    def current() -> datetime:
        return now + timedelta(seconds=time.monotonic() - started)

    with engine.connect() as conn:
        due = conn.execute(select(nt).where(nt.c.status == "pending",
                                            nt.c.next_attempt_at <= now)
                           .order_by(nt.c.id).limit(limit)).all()
    for row in due:
        with engine.begin() as conn:
            leased = conn.execute(update(nt).where(
                nt.c.id == row.id, nt.c.status == "pending",
                nt.c.next_attempt_at == row.next_attempt_at,
            ).values(next_attempt_at=current() + _LEASE)).rowcount
        if not leased:
            continue
        ok, error = _post(settings, row)
        attempts = row.attempts + 1
        with engine.begin() as conn:
            if ok:
                conn.execute(update(nt).where(nt.c.id == row.id).values(
                    status="sent", attempts=attempts, sent_at=_now(), last_error=None))
                report.sent.append(row.id)
            elif attempts >= settings.webhook_max_attempts:
                conn.execute(update(nt).where(nt.c.id == row.id).values(
                    status="failed", attempts=attempts, last_error=error))
                report.failed.append(row.id)
                log.error("webhook %s (%s) failed after %s attempts: %s", row.id, row.event,
                          attempts, error)
            else:
                wait = settings.webhook_backoff_s * 2 ** (attempts - 1)
                conn.execute(update(nt).where(nt.c.id == row.id).values(
                    attempts=attempts, last_error=error,
                    next_attempt_at=current() + timedelta(seconds=wait)))
                report.retrying.append(row.id)
    return report


def prune(engine: Engine, settings: Settings, now: datetime | None = None,
          batch_size: int = PRUNE_BATCH) -> int:
    """Delete ``sent`` and ``failed`` rows whose last attempt is older than
    ``webhook_keep_days`` (0: keep all); returns how many. ``pending`` rows are never touched.

    The age is ``next_attempt_at``, which a sweep sets to the lease's end when it takes a row
    and never moves once the row is settled: the last attempt plus at most a minute, and
    covered by the (status, next_attempt_at) index. Deleted ``batch_size`` rows per
    transaction, so a large backlog never holds one long transaction and its locks."""
    assert batch_size >= 1, batch_size
    if settings.webhook_keep_days <= 0:
        return 0
    cutoff = (now or _now()) - timedelta(days=settings.webhook_keep_days)
    old = (nt.c.status.in_(("sent", "failed")), nt.c.next_attempt_at < cutoff)
    total = 0
    while True:
        with engine.begin() as conn:
            batch = select(nt.c.id).where(*old).limit(batch_size)
            n = conn.execute(delete(nt).where(nt.c.id.in_(batch), *old)).rowcount
        total += n
        if n < batch_size:
            break
    if total:
        log.info("webhook outbox: pruned %s delivered or given-up rows older than %g days",
                 total, settings.webhook_keep_days)
    return total


def list_notifications(conn: Connection, status: str | None, limit: int) -> list[dict[str, Any]]:
    stmt = select(nt).order_by(nt.c.id.desc()).limit(limit)
    if status:
        stmt = stmt.where(nt.c.status == status)
    return [dict(r) for r in conn.execute(stmt).mappings()]
