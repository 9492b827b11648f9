"""The queries behind the dashboard's charts and tables (SQLite and Postgres alike).

Everything returns plain, JSON-ready values; time series are columnar (``t`` in unix
seconds plus one list per series, zero-filled buckets) because that is what uPlot draws
without any reshaping in the browser.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, Connection, case, func, inspect, select

from service.line_balance import balance_answer, scoped
from service.models import ACTIVE_JOB_STATUSES
from service.models import feedback_events as fe
from service.models import job_metrics as jm
from service.models import training_jobs as tj
from service.queries import Filters
from service.rollout_stats import wilson_interval
from service.settings import Settings

Bucket = Literal["day", "hour"]
BUCKET_S = {"day": 86400, "hour": 3600}

#: The engine's metric names the job page plots, in display order (others are kept too).
CHART_METRICS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
                 "tokens_per_s", "grad_norm", "lr", "logps/chosen", "logps/rejected")
MAX_SERIES = 32


def floor_to(ts: datetime, bucket: Bucket) -> datetime:
    ts = ts.astimezone(UTC)
    if bucket == "day":
        return ts.replace(hour=0, minute=0, second=0, microsecond=0)
    return ts.replace(minute=0, second=0, microsecond=0)


def _bucket_expr(conn: Connection, column: Any, bucket: Bucket) -> ColumnElement[Any]:
    if conn.dialect.name == "postgresql":
        return func.date_trunc(bucket, column)  # sessions run with timezone=UTC
    fmt = "%Y-%m-%d 00:00:00" if bucket == "day" else "%Y-%m-%d %H:00:00"
    return func.strftime(fmt, column)  # SQLite stores naive UTC text


def _epoch(value: Any) -> int:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp())


def _axis(since: datetime, until: datetime, bucket: Bucket) -> list[int]:
    step = BUCKET_S[bucket]
    start = int(floor_to(since, bucket).timestamp())
    end = int(until.timestamp())
    return list(range(start, end, step)) or [start]


def label_counts(conn: Connection, bucket: Bucket, since: datetime, until: datetime,
                 scope: Filters = Filters()) -> dict[str, Any]:
    """Desirable/undesirable counts per bucket of occurred_at in [since, until), counting
    only the latest vote on each answer (the balancer's rule), within ``scope`` (a line's
    feedback scope, from :func:`balance_now`)."""
    b = _bucket_expr(conn, fe.c.occurred_at, bucket).label("b")
    stmt = replace(scope, since=floor_to(since, bucket), until=until).apply(select(
        b,
        func.sum(case((fe.c.desirable.is_(True), 1), else_=0)),
        func.sum(case((fe.c.desirable.is_(False), 1), else_=0)),
    )).group_by(b)
    got = {_epoch(t): (int(d), int(u)) for t, d, u in conn.execute(stmt).all()}
    t = _axis(since, until, bucket)
    return {"bucket": bucket, "bucket_s": BUCKET_S[bucket], "t": t,
            "desirable": [got.get(x, (0, 0))[0] for x in t],
            "undesirable": [got.get(x, (0, 0))[1] for x in t]}


def first_id_received_since(conn: Connection, since: datetime) -> int | None:
    """Smallest id whose row arrived at or after ``since`` (None: nothing that recent).

    received_at has no index, but ids are assigned in arrival order, so a binary search over
    the primary key (about 40 one-row probes) bounds the scan to the recent rows instead of
    reading the whole table on every poll."""
    lo, hi = conn.execute(select(func.min(fe.c.id), func.max(fe.c.id))).one()
    if hi is None:
        return None

    def at_or_after(i: int) -> Any:
        return conn.execute(select(fe.c.id, fe.c.received_at).where(fe.c.id >= i)
                            .order_by(fe.c.id).limit(1)).one()

    last = at_or_after(hi)
    if last.received_at < since:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if at_or_after(mid).received_at >= since:
            hi = mid
        else:
            lo = mid + 1
    return int(at_or_after(lo).id)


def ingestion(conn: Connection, since: datetime, until: datetime) -> dict[str, Any]:
    """Events stored per hour (by received_at, every stored event: replaced votes too)."""
    t = _axis(since, until, "hour")
    start_id = first_id_received_since(conn, floor_to(since, "hour"))
    got: dict[int, int] = {}
    if start_id is not None:
        b = _bucket_expr(conn, fe.c.received_at, "hour").label("b")
        rows = conn.execute(select(b, func.count()).where(
            fe.c.id >= start_id, fe.c.received_at >= floor_to(since, "hour"),
            fe.c.received_at < until).group_by(b)).all()
        got = {_epoch(x): int(n) for x, n in rows}
    received = [got.get(x, 0) for x in t]
    return {"bucket_s": 3600, "t": t, "received": received,
            "current_hour": received[-1] if received else 0, "total": sum(received)}


def balance_now(conn: Connection, settings: Settings, line: str | None = None
                ) -> tuple[Filters, dict[str, Any]]:
    """The line's feedback scope (every event without a line) and λD/λU over it, latest vote
    each: exactly what GET /v1/balance[?line=] answers (service.line_balance). 404/409 for a
    line that cannot be used; the caller's connection must be able to write (get_line may
    create the default line from settings)."""
    scope, about = scoped(conn, settings, Filters(), line)
    return scope, {**about, **balance_answer(conn, settings, scope)}


def _iso(v: datetime | None) -> str | None:
    return v.isoformat() if v is not None else None


def job_summary(row: dict[str, Any]) -> dict[str, Any]:
    """What the pages show about a job (no attempt token, no internal fields)."""
    total = row.get("total_steps")
    step = row.get("step") or 0
    return {
        "id": row["id"], "line": row["line"], "status": row["status"],
        "trigger": row["trigger"], "step": step, "total_steps": total,
        "progress": (min(1.0, step / total) if total else None),
        "attempt": row["attempt"], "max_attempts": row["max_attempts"],
        "retries": row.get("retries") or 0,
        "cancel_requested": bool(row["cancel_requested"]),
        "n_desirable": row["n_desirable"], "n_undesirable": row["n_undesirable"],
        "n_users": row["n_users"], "lambda_d": row["lambda_d"], "lambda_u": row["lambda_u"],
        "reference_snapshot_id": row.get("reference_snapshot_id"),
        "created_at": _iso(row["created_at"]), "started_at": _iso(row.get("started_at")),
        "finished_at": _iso(row.get("finished_at")),
        "heartbeat_at": _iso(row.get("heartbeat_at")), "error": row.get("error"),
        "active": row["status"] in ACTIVE_JOB_STATUSES,
    }


def active_jobs(conn: Connection) -> list[dict[str, Any]]:
    rows = conn.execute(select(tj).where(tj.c.status.in_(ACTIVE_JOB_STATUSES))
                        .order_by(tj.c.id)).mappings().all()
    return [job_summary(dict(r)) for r in rows]


def metric_series(conn: Connection, job_id: int, after_step: int, limit: int
                  ) -> dict[str, Any]:
    """Steps after ``after_step``, columnar: {"step": [...], "series": {name: [...]}}; a
    step that lacks a metric has null there (uPlot draws a gap)."""
    rows = conn.execute(select(jm.c.step, jm.c.metrics).where(
        jm.c.job_id == job_id, jm.c.step > after_step).order_by(jm.c.step).limit(limit + 1)
    ).all()
    more = len(rows) > limit
    rows = rows[:limit]
    names: list[str] = [n for n in CHART_METRICS]
    for _, m in rows:
        for k, v in (m or {}).items():
            if (k not in names and len(names) < MAX_SERIES and isinstance(v, int | float)
                    and not isinstance(v, bool) and k not in ("step", "total_steps")):
                names.append(k)
    series: dict[str, list[float | None]] = {n: [] for n in names}
    for _, m in rows:
        m = m or {}
        for n in names:
            v = m.get(n)
            ok = isinstance(v, int | float) and not isinstance(v, bool) and v == v \
                and v not in (float("inf"), float("-inf"))
            series[n].append(float(v) if ok else None)
    return {"job_id": job_id, "step": [int(s) for s, _ in rows], "series": series,
            "next_after_step": rows[-1][0] if rows else after_step, "more": more}


def version_rates(conn: Connection, since: datetime, limit: int = 20,
                  versions: list[str] | None = None) -> list[dict[str, Any]]:
    """Live thumbs-up rate per model_version since ``since`` (latest vote each), with 95 %
    Wilson intervals; the versions with the most feedback first (or just ``versions``)."""
    n = func.count().label("n")
    up = func.sum(case((fe.c.desirable.is_(True), 1), else_=0)).label("up")
    stmt = Filters(since=since).apply(select(fe.c.model_version, up, n))
    if versions is not None:
        if not versions:
            return []
        stmt = stmt.where(fe.c.model_version.in_(versions))
    stmt = (stmt.group_by(fe.c.model_version).order_by(n.desc(), fe.c.model_version)
            .limit(limit if versions is None else len(versions)))
    out = []
    for version, ups, total in conn.execute(stmt).all():
        lo, hi = wilson_interval(int(ups), int(total))
        out.append({"model_version": version, "up": int(ups), "n": int(total),
                    "rate": int(ups) / int(total) if total else None, "low": lo, "high": hi})
    return out


def has_table(conn: Connection, name: str) -> bool:
    return bool(inspect(conn).has_table(name))


def now_utc() -> datetime:
    return datetime.now(UTC)


def window(days: float, until: datetime | None = None) -> tuple[datetime, datetime]:
    until = until or now_utc()
    return until - timedelta(days=days), until
