"""Data rights: erase a user's feedback, delete events past the retention window, and keep the
lineage of what was deleted, so checkpoints trained on it can be found and retired.

Jobs freeze their data as an event-id range plus filters (``service.jobs.selection_for``):
the trainer reads ``(min_event_id, max_event_id]`` within the window and the line's feedback
scope, latest vote only, the train split (``split_bucket``), at most ``max_events_per_user``
most recent events per user.
Before events are deleted, each job whose range overlaps them is asked, in SQL, which of them
its selection holds; the answer is stored per (erasure, job) in ``erasure_jobs``:

* ``n_trained``: in the job's training selection;
* ``n_held_out``: in the job's window but in the held-out split (the gate scored them, no job
  trained on them).

Exact where it can be: the per-user rank is computed over the same user's events only (the
cap partitions by user), deletions run in ascending id order (deleting older events never
changes a newer event's rank), and rows are locked while counted and deleted. Where rows of a
job's range were deleted *after* the job was created by an earlier erasure, the cap or a
replacement may have differed when the job ran; those answers are marked ``exact = false``
and can only over-count ("may have been trained on"), never miss.

A user erasure keeps the deleted event ids, hashed (``erased_event_ids``), in the same
transaction as the delete: a client retrying one of those events later is answered as a
duplicate and nothing is stored again. Retention keeps none (that would be every event ever);
a late copy of an old event is past the window and goes again on its next run.

Against ingestion in flight (``service.user_locks``): each transaction of a user erasure holds
the user's lock exclusively, each ingest transaction holds the locks of the users it writes,
shared, from before its INSERT until it commits (SQLite: one writer at a time, and ingestion
reads the erased ids after its INSERT took the write lock). So every ingestion of the user's
events is ordered wholly before or wholly after each of the erasure's transactions, and in
particular its last one, which finds none of the user's events left and sets ``completed_at``:

* before it: the erasure deletes those events and keeps their ids;
* after it: the INSERT sees every kept id, so a retry of an erased event is a duplicate (it
  waited, if it raced the transaction deleting it), and a new event is stored: new data,
  received after the erasure took effect (an erasure is not an opt-out).

Once ``erase_user`` returns, no event of the user whose ingestion committed (was answered)
before the erasure completed is stored, and no retry of an erased event ever is. An event sent
while the erasure runs may fall on either side; one whose ingestion waited for the last
transaction is answered after it, possibly just before the erasure's own answer. Anonymous
events name no user, take no lock and are not erased by user.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, case, delete, func, insert, or_, select, update

from service import user_locks
from service.db import dialect_insert, newest_first
from service.ingest import event_id_hash
from service.jobs import selection_for
from service.models import LIVE_STAGES
from service.models import checkpoints as ck
from service.models import erased_event_ids as ee
from service.models import erasure_jobs as ej
from service.models import erasures as er
from service.models import feedback_events as fe
from service.models import training_jobs as tj
from service.selection import SPLIT_BUCKETS, Selection
from service.settings import Settings

log = logging.getLogger("prospect.erasure")

#: The beat task (worker/tasks.py) that applies PROSPECT_FEEDBACK_RETENTION_DAYS.
FEEDBACK_RETENTION_TASK = "prospect.feedback_retention"

#: Events deleted per transaction: bounds lock time and the IN lists (SQLite allows 32766
#: parameters).
CHUNK = 1000
_ANON = ""
_ROW_COLS = (fe.c.id, fe.c.user_hash)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class JobImpact:
    job_id: int
    n_trained: int = 0
    n_held_out: int = 0
    exact: bool = True
    job_status: str = ""
    job_attempt: int = 0


@dataclass
class ErasureResult:
    erasure_id: int | None
    kind: str
    n_events: int = 0
    jobs: dict[int, JobImpact] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"erasure_id": self.erasure_id, "kind": self.kind, "n_events": self.n_events,
                "jobs": [asdict(j) for j in sorted(self.jobs.values(), key=lambda j: j.job_id)]}


# ---- which deleted events a job's selection held

def _user_filter(users: set[str]) -> Any:
    named = sorted(u for u in users if u != _ANON)
    conds = []
    if named:
        conds.append(fe.c.user_hash.in_(named))
    if _ANON in users:
        conds.append(fe.c.user_hash.is_(None))
    return or_(*conds)


def _selected_among(conn: Connection, sel: Selection, ids: list[int], users: set[str]) -> int:
    """How many of ``ids`` the selection holds. Mirrors ``service.selection._ranked`` (a test
    pins the two against each other), restricted to the users of ``ids``: the per-user rank
    only looks at the same user's events, so the restriction changes no rank and keeps the
    window function small."""
    user = func.coalesce(fe.c.user_hash, _ANON)
    stmt = select(fe.c.id, func.row_number().over(partition_by=user,
                                                  order_by=fe.c.id.desc()).label("rn"))
    stmt = sel.filters.apply(stmt)
    cut = round(sel.holdout_fraction * SPLIT_BUCKETS)
    stmt = stmt.where(fe.c.split_bucket >= cut if sel.split == "train" else fe.c.split_bucket < cut)
    stmt = stmt.where(_user_filter(users))
    ranked = stmt.subquery("ranked")
    count = select(func.count()).select_from(ranked).where(ranked.c.id.in_(ids))
    if sel.max_events_per_user:
        count = count.where(ranked.c.rn <= sel.max_events_per_user)
    return int(conn.execute(count).scalar_one())


def _deleted_later(conn: Connection, job: dict[str, Any], erasure_id: int, min_id: int,
                   users: set[str]) -> bool:
    """An earlier erasure, made after the job was created, deleted events of the job's range
    newer than some of ours: ranks (the cap) or replacements may have differed then. Another
    user's erasure does not count (the cap ranks each user's events among their own; a vote
    replaces the same user's earlier vote)."""
    return conn.execute(select(er.c.id).where(
        er.c.id != erasure_id, er.c.n_events > 0, er.c.created_at >= job["created_at"],
        er.c.min_event_id <= job["max_event_id"], er.c.max_event_id > job["min_event_id"],
        er.c.max_event_id > min_id,
        or_(er.c.kind != "user", er.c.user_hash.in_(sorted(users - {_ANON}))),
    ).limit(1)).first() is not None


def job_impacts(conn: Connection, settings: Settings, erasure_id: int,
                rows: list[Any]) -> list[JobImpact]:
    """For each job whose frozen range overlaps ``rows`` (id, user_hash; not yet deleted):
    how many of them it trained on or held out."""
    if not rows:
        return []
    ids = [r.id for r in rows]
    lo, hi = min(ids), max(ids)
    users = {r.user_hash or _ANON for r in rows}
    jobs = conn.execute(select(tj).where(tj.c.min_event_id < hi, tj.c.max_event_id >= lo)
                        .order_by(tj.c.id)).mappings().all()
    out = []
    for job in jobs:
        data = job["data"] or {}
        exact = "holdout_fraction" in data and "max_events_per_user" in data
        job = dict(job)
        job["data"] = {"holdout_fraction": settings.holdout_fraction,
                       "max_events_per_user": settings.max_events_per_user, **data}
        sel = selection_for(job, settings)
        n_trained = _selected_among(conn, sel, ids, users)
        n_held_out = (_selected_among(conn, replace(sel, split="holdout"), ids, users)
                      if sel.holdout_fraction > 0 else 0)
        if not n_trained and not n_held_out:
            continue
        exact = exact and not _deleted_later(conn, job, erasure_id, lo, users)
        out.append(JobImpact(job["id"], n_trained, n_held_out, exact, job["status"],
                             job["attempt"]))
    return out


# ---- deleting, chunk by chunk, with the lineage recorded in the same transaction

def _record(conn: Connection, erasure_id: int, impacts: Iterable[JobImpact]) -> None:
    for imp in impacts:
        prev = conn.execute(select(ej).where(ej.c.erasure_id == erasure_id,
                                             ej.c.job_id == imp.job_id)).mappings().first()
        if prev is None:
            conn.execute(insert(ej).values(
                erasure_id=erasure_id, job_id=imp.job_id, n_trained=imp.n_trained,
                n_held_out=imp.n_held_out, exact=imp.exact, job_status=imp.job_status,
                job_attempt=imp.job_attempt))
        else:
            conn.execute(update(ej).where(ej.c.erasure_id == erasure_id,
                                          ej.c.job_id == imp.job_id).values(
                n_trained=prev["n_trained"] + imp.n_trained,
                n_held_out=prev["n_held_out"] + imp.n_held_out,
                exact=bool(prev["exact"]) and imp.exact))


def _merge(result: ErasureResult, impacts: Iterable[JobImpact]) -> None:
    for imp in impacts:
        cur = result.jobs.get(imp.job_id)
        if cur is None:
            result.jobs[imp.job_id] = replace(imp)
        else:
            cur.n_trained += imp.n_trained
            cur.n_held_out += imp.n_held_out
            cur.exact = cur.exact and imp.exact


def _tombstone(conn: Connection, erasure_id: int, event_ids: list[str]) -> None:
    """Keep the erased ids (hashed), so ingestion answers a retry of one as a duplicate
    instead of storing it again."""
    conn.execute(dialect_insert(conn, ee).on_conflict_do_nothing(index_elements=["event_id_hash"]),
                 [{"event_id_hash": event_id_hash(e), "erasure_id": erasure_id} for e in event_ids])


def _rows(conn: Connection, cols: tuple[Any, ...], where: Any, after: int, chunk: int
          ) -> list[Any]:
    return list(conn.execute(select(*cols).where(where, fe.c.id > after)
                             .order_by(fe.c.id).limit(chunk).with_for_update()).all())


def _run(engine: Engine, settings: Settings, erasure_id: int, where: Any,
         result: ErasureResult, chunk: int = CHUNK, user_hash: str | None = None) -> None:
    """Delete the events matching ``where``, oldest id first, ``chunk`` per transaction.

    A user erasure (``user_hash``) also keeps their hashed event ids in the same transaction,
    holds the user's lock in each transaction (service.user_locks), and completes only in a
    transaction that finds none of the user's events left, whatever their id (ids only grow,
    SQLite's too since migration 0009, but completing does not rely on the cursor for that)."""
    cols = (*_ROW_COLS, fe.c.event_id) if user_hash is not None else _ROW_COLS
    after = 0
    while True:
        with engine.begin() as conn:
            if user_hash is not None:
                user_locks.hold(conn, user_locks.erasure_keys(user_hash), shared=False)
            # A write first: on SQLite it takes the write lock before anything is read, so
            # no other writer changes these rows between counting and deleting (Postgres:
            # FOR UPDATE below).
            conn.execute(update(er).where(er.c.id == erasure_id).values(completed_at=None))
            rows = _rows(conn, cols, where, after, chunk)
            if not rows and after and user_hash is not None:
                rows = _rows(conn, cols, where, 0, chunk)
            if not rows:
                conn.execute(update(er).where(er.c.id == erasure_id)
                             .values(completed_at=_now()))
                return
            ids = [r.id for r in rows]
            lo, hi = min(ids), max(ids)
            impacts = job_impacts(conn, settings, erasure_id, rows)
            _record(conn, erasure_id, impacts)
            if user_hash is not None:
                _tombstone(conn, erasure_id, [r.event_id for r in rows])
            n = conn.execute(delete(fe).where(fe.c.id.in_(ids))).rowcount
            conn.execute(update(er).where(er.c.id == erasure_id).values(
                n_events=er.c.n_events + n,
                min_event_id=case((er.c.min_event_id < lo, er.c.min_event_id), else_=lo),
                max_event_id=case((er.c.max_event_id > hi, er.c.max_event_id), else_=hi)))
        result.n_events += n
        _merge(result, impacts)
        after = ids[-1]


def _new_erasure(engine: Engine, **values: Any) -> int:
    with engine.begin() as conn:
        return int(conn.execute(insert(er).values(created_at=_now(), **values)
                                .returning(er.c.id)).scalar_one())


def erase_user(engine: Engine, settings: Settings, user_hash: str, *, actor: str,
               key_id: int | None = None, reason: str | None = None) -> ErasureResult:
    """Delete every event of one user (by the keyed hash ingestion stored) and record which
    jobs had them. Idempotent: a repeat deletes nothing and is recorded as such."""
    erasure_id = _new_erasure(engine, kind="user", user_hash=user_hash, actor=actor,
                              key_id=key_id, reason=reason)
    result = ErasureResult(erasure_id, "user")
    _run(engine, settings, erasure_id, fe.c.user_hash == user_hash, result, user_hash=user_hash)
    log.info("erased a user's feedback", extra={"erasure_id": erasure_id,
                                                 "n_events": result.n_events,
                                                 "n_jobs": len(result.jobs)})
    return result


def apply_retention(engine: Engine, settings: Settings, now: datetime | None = None,
                    chunk: int = CHUNK) -> ErasureResult | None:
    """Delete events whose occurred_at lies before now − PROSPECT_FEEDBACK_RETENTION_DAYS
    (occurred_at is indexed and never later than received_at + the allowed clock skew, so
    no event outlives the window by more than that). None when retention is off; no
    erasure row when nothing is due."""
    if settings.feedback_retention_days <= 0:
        return None
    cutoff = (now or _now()) - timedelta(days=settings.feedback_retention_days)
    with engine.connect() as conn:
        # Bounded by the newest old id (from the (occurred_at, id) index), so the last chunk
        # does not scan the rest of the table to find nothing.
        hi = conn.execute(select(func.max(fe.c.id)).where(fe.c.occurred_at < cutoff)
                          ).scalar_one_or_none()
    if hi is None:
        return ErasureResult(None, "retention")
    where = (fe.c.occurred_at < cutoff) & (fe.c.id <= hi)
    erasure_id = _new_erasure(engine, kind="retention", cutoff=cutoff, actor="retention")
    result = ErasureResult(erasure_id, "retention")
    _run(engine, settings, erasure_id, where, result, chunk)
    log.info("retention deleted feedback", extra={"erasure_id": erasure_id,
                                                  "n_events": result.n_events,
                                                  "cutoff": cutoff.isoformat()})
    return result


# ---- reading it back

def get_erasure(conn: Connection, erasure_id: int) -> dict[str, Any] | None:
    row = conn.execute(select(er).where(er.c.id == erasure_id)).mappings().first()
    if row is None:
        return None
    out = dict(row)
    out["jobs"] = [dict(r) for r in conn.execute(
        select(ej).where(ej.c.erasure_id == erasure_id).order_by(ej.c.job_id)).mappings()]
    return out


def list_erasures(conn: Connection, *, kind: str | None, limit: int, before_id: int | None
                  ) -> list[dict[str, Any]]:
    rows = newest_first(conn, er, limit=limit, before_id=before_id, kind=kind)
    links: dict[int, list[dict[str, Any]]] = {}
    if rows:
        for r in conn.execute(select(ej).where(ej.c.erasure_id.in_([x["id"] for x in rows]))
                              .order_by(ej.c.job_id)).mappings():
            links.setdefault(r["erasure_id"], []).append(dict(r))
    for r in rows:
        r["jobs"] = links.get(r["id"], [])
    return rows


#: Strongest first: a job's verdict over all its erasures is the strongest one.
VERDICTS = ("trained", "may_have_trained", "held_out_only", "not_trained")


def _verdict(link: dict[str, Any], job: dict[str, Any]) -> str:
    unstarted = link["job_status"] in ("queued", "cancelled", "failed") and not link["job_attempt"]
    if unstarted:
        # It reads its data when it starts (and the gate its held-out split later still):
        # after the erasure committed, the events were gone; a job cancelled (or failed)
        # before any attempt never read them. A claim that raced the erasure is "may have".
        started = job["started_at"]
        done = link["completed_at"]
        if started is None or (done is not None and started > done):
            return "not_trained"
    if not link["n_trained"]:
        return "held_out_only"
    return "trained" if link["exact"] and not unstarted else "may_have_trained"


def erased_lineage(conn: Connection, *, line: str | None = None,
                   include_untrained: bool = False, limit: int = 1000) -> dict[str, Any]:
    """Jobs whose training selection held events deleted since, with their checkpoints, and
    every checkpoint that descends from one of those (it started from such weights: its
    π_ref was taken from an affected checkpoint)."""
    stmt = (select(ej, er.c.created_at.label("erased_at"), er.c.completed_at, er.c.kind)
            .join(er, er.c.id == ej.c.erasure_id))
    links = conn.execute(stmt.order_by(ej.c.job_id, ej.c.erasure_id)).mappings().all()
    job_ids = sorted({link["job_id"] for link in links})
    jobs = {j["id"]: dict(j) for j in conn.execute(
        select(tj.c.id, tj.c.line, tj.c.status, tj.c.started_at, tj.c.finished_at,
               tj.c.min_event_id, tj.c.max_event_id)
        .where(tj.c.id.in_(job_ids))).mappings()} if job_ids else {}
    per_job: dict[int, dict[str, Any]] = {}
    for link in links:
        job = jobs.get(link["job_id"])
        if job is None or (line is not None and job["line"] != line):
            continue
        verdict = _verdict(link, job)
        cur = per_job.setdefault(job["id"], {
            "job_id": job["id"], "line": job["line"], "status": job["status"],
            "verdict": verdict, "n_trained": 0, "n_held_out": 0, "exact": True,
            "erasure_ids": [],
            "first_erased_at": link["erased_at"], "last_erased_at": link["erased_at"],
            "checkpoints": []})
        if VERDICTS.index(verdict) < VERDICTS.index(cur["verdict"]):
            cur["verdict"] = verdict
        cur["n_trained"] += link["n_trained"]
        cur["n_held_out"] += link["n_held_out"]
        cur["exact"] = cur["exact"] and bool(link["exact"])
        cur["erasure_ids"].append(link["erasure_id"])
        cur["first_erased_at"] = min(cur["first_erased_at"], link["erased_at"])
        cur["last_erased_at"] = max(cur["last_erased_at"], link["erased_at"])
    wanted = ("trained", "may_have_trained") if not include_untrained else VERDICTS
    affected = {jid: j for jid, j in per_job.items() if j["verdict"] in wanted}

    ckpts: dict[int, dict[str, Any]] = {}
    cols = (ck.c.id, ck.c.line, ck.c.model_version, ck.c.stage, ck.c.job_id, ck.c.parent_id,
            ck.c.files_deleted_at)
    if affected:
        for c in conn.execute(select(*cols).where(ck.c.job_id.in_(list(affected)))).mappings():
            job = affected[c["job_id"]]
            job["checkpoints"].append(c["id"])
            if job["verdict"] in ("trained", "may_have_trained"):
                ckpts[c["id"]] = {**_ckpt_out(c), "verdict": job["verdict"],
                                  "via_checkpoint_id": None}
    # Descendants: breadth first over parent_id (a line's chain is short).
    frontier = list(ckpts)
    while frontier:
        children = conn.execute(select(*cols).where(ck.c.parent_id.in_(frontier))).mappings()
        frontier = []
        for c in children:
            if c["id"] in ckpts:
                continue
            ckpts[c["id"]] = {**_ckpt_out(c), "verdict": "inherits",
                              "via_checkpoint_id": c["parent_id"]}
            frontier.append(c["id"])
    out_jobs = sorted(affected.values(), key=lambda j: j["job_id"], reverse=True)
    out_ckpts = sorted((c for c in ckpts.values() if line is None or c["line"] == line),
                       key=lambda c: c["id"], reverse=True)
    return {"jobs": out_jobs[:limit], "truncated": len(out_jobs) > limit,
            "checkpoints": out_ckpts,
            "live_checkpoints": [c["id"] for c in out_ckpts if c["live"]]}


def _ckpt_out(c: Any) -> dict[str, Any]:
    return {"id": c["id"], "line": c["line"],
            "model_version": c["model_version"],
            "stage": c["stage"], "job_id": c["job_id"], "parent_id": c["parent_id"],
            "live": c["stage"] in LIVE_STAGES, "files_deleted": c["files_deleted_at"] is not None}

