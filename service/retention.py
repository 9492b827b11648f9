"""Artifact retention and disk usage.

What may be removed (files only; rows stay for the lineage and the audit trail):

* checkpoints in ``retired`` or ``rejected``: beyond the newest ``keep`` of that stage per
  line (retired ones are rollback targets), or older than ``max_age_days``;
* π_ref snapshots no live checkpoint or active job needs: not the line's latest ready one
  (the next job's π_ref), not referenced by a queued/running job, and not the π_ref of a job
  whose checkpoint is pending/candidate/canary/production or not yet registered;
* resume states (``checkpoints/step-*``) of finished jobs: only a re-queued attempt resumes,
  or a retried job (it starts over when they are gone);
* the ``final/`` model of a failed or cancelled job (one cancelled after its last step): no
  checkpoint row owns it, and a retry writes it again.

Never anything sooner than ``min_age_s`` after it left use (a snapshot's ages count from then,
not from when it was taken). Every removal of a checkpoint or snapshot is first claimed in the
database with a conditional UPDATE (``files_deleted_at`` / snapshot status ``deleted``), the
same row a promotion checks, so a checkpoint cannot be promoted while its files go away; a
checkpoint's removal is then recorded in ``rollout_events`` (actor: the beat task, or the API
key that asked). Resume states and unregistered models, which have no row of their own, are claimed by renaming their
folder while their job's row is held and still finished, so of concurrent cleanups exactly one
deletes them, and never those of a job retried meanwhile (service/job_retry.py).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, and_, exists, func, select, update

from service import registry
from service.models import ACTIVE_JOB_STATUSES, LIVE_STAGES
from service.models import checkpoints as ck
from service.models import reference_snapshots as rs
from service.models import training_jobs as tj
from service.references import remove_snapshot_files
from service.settings import Settings

log = logging.getLogger("prospect.retention")
FINISHED_JOB_STATUSES = ("succeeded", "failed", "cancelled")
#: Finished jobs whose final/ no checkpoint will ever own (only a success is registered).
UNREGISTERED_JOB_STATUSES = ("failed", "cancelled")


def _now() -> datetime:
    return datetime.now(UTC)


def tree_bytes(path: str | Path | None) -> int:
    if not path or not os.path.isdir(path):
        return 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


@dataclass
class Item:
    kind: str  # checkpoint | snapshot | resume_states | unregistered_model
    id: int
    line: str
    paths: list[str]
    bytes: int
    reason: str


@dataclass
class RetentionReport:
    dry_run: bool
    removed: list[Item] = field(default_factory=list)
    freed_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "freed_bytes": self.freed_bytes,
                "removed": [asdict(i) for i in self.removed]}


def _eligible(rows: list[Any], keep: int, max_age: timedelta | None, min_age: timedelta,
              now: datetime, at: str) -> list[tuple[Any, str]]:
    """Rows (newest first) past the count or the age, and past the minimum age."""
    out = []
    for rank, r in enumerate(rows):
        when = getattr(r, at)
        if when is None or now - when < min_age:
            continue
        if rank >= keep:
            out.append((r, f"beyond the newest {keep}"))
        elif max_age is not None and now - when > max_age:
            out.append((r, f"older than {max_age.total_seconds() / 86400:g} days"))
    return out


def plan(conn: Connection, settings: Settings, now: datetime | None = None) -> list[Item]:
    """What retention would remove now (nothing is touched)."""
    now = now or _now()
    max_age = (timedelta(days=settings.retention_max_age_days)
               if settings.retention_max_age_days > 0 else None)
    min_age = timedelta(seconds=settings.retention_min_age_s)
    items: list[Item] = []
    lines = conn.execute(select(ck.c.line).distinct()).scalars().all()
    snap_lines = conn.execute(select(rs.c.line).distinct()).scalars().all()
    # Snapshots being copied from a checkpoint folder (one pending for a day is stuck).
    copying = set(conn.execute(select(rs.c.source).where(
        rs.c.status == "pending", rs.c.created_at > now - timedelta(days=1))).scalars())
    for line in lines:
        for stage, keep in (("retired", settings.retention_keep_retired),
                            ("rejected", settings.retention_keep_rejected)):
            rows = conn.execute(select(ck.c.id, ck.c.line, ck.c.artifact_path,
                                       ck.c.adapter_path, ck.c.stage_changed_at,
                                       ck.c.files_deleted_at)
                                .where(ck.c.line == line, ck.c.stage == stage)
                                .order_by(ck.c.stage_changed_at.desc(), ck.c.id.desc())).all()
            for r, why in _eligible(rows, keep, max_age, min_age, now, "stage_changed_at"):
                if r.files_deleted_at is not None or r.artifact_path in copying:
                    continue
                paths = [p for p in (r.artifact_path, r.adapter_path) if p and os.path.isdir(p)]
                if paths:
                    items.append(Item("checkpoint", r.id, line, paths,
                                      sum(tree_bytes(p) for p in paths), f"{stage}, {why}"))
    for line in snap_lines:
        rows = conn.execute(select(rs.c.id, rs.c.line, rs.c.path, rs.c.finished_at)
                            .where(rs.c.line == line, rs.c.status == "ready",
                                   ~_snapshot_needed())
                            .order_by(rs.c.id.desc())).all()
        latest = conn.execute(select(rs.c.id).where(rs.c.line == line, rs.c.status == "ready")
                              .order_by(rs.c.id.desc()).limit(1)).scalar_one_or_none()
        rows = [_Snap(r.id, r.path, _snapshot_left_use(conn, r)) for r in rows if r.id != latest]
        for r, why in _eligible(rows, settings.retention_keep_snapshots, max_age, min_age, now,
                                "left_use"):
            if r.path and os.path.isdir(r.path):
                items.append(Item("snapshot", r.id, line, [r.path], tree_bytes(r.path),
                                  f"unused snapshot, {why}"))
    if settings.retention_prune_resume_states:
        done = conn.execute(select(tj.c.id, tj.c.line, tj.c.output_dir, tj.c.finished_at)
                            .where(tj.c.status.in_(FINISHED_JOB_STATUSES),
                                   tj.c.output_dir.is_not(None))).all()
        for j in done:
            states = Path(j.output_dir) / "checkpoints"
            if (j.finished_at is not None and now - j.finished_at >= min_age
                    and states.is_dir() and any(states.iterdir())):
                items.append(Item("resume_states", j.id, j.line, [str(states)],
                                  tree_bytes(states), "resume states of a finished job"))
    # A run cancelled after its last step (or failed while settling) wrote final/, which no
    # checkpoint row owns: nothing else would ever remove a whole model's weights.
    orphans = conn.execute(select(tj.c.id, tj.c.line, tj.c.output_dir, tj.c.finished_at, tj.c.status)
                           .where(tj.c.status.in_(UNREGISTERED_JOB_STATUSES),
                                  tj.c.output_dir.is_not(None),
                                  ~exists().where(ck.c.job_id == tj.c.id))).all()
    for j in orphans:
        final = Path(j.output_dir) / "final"
        if (j.finished_at is not None and now - j.finished_at >= min_age and final.is_dir()
                and any(final.iterdir())):
            items.append(Item("unregistered_model", j.id, j.line, [str(final)], tree_bytes(final),
                              f"final model of a {j.status} job, never registered"))
    return items


@dataclass
class _Snap:
    id: int
    path: str | None
    left_use: datetime | None


def _snapshot_left_use(conn: Connection, r: Any) -> datetime | None:
    """When an unneeded snapshot left use (min_age and max_age count from then, as a
    checkpoint's from its stage change): the latest of when it was taken, when a newer one of
    its line replaced it as the next job's π_ref, when the last job that used it finished and
    when the last checkpoint naming it left its stage."""
    times = [r.finished_at, *conn.execute(select(
        select(func.min(rs.c.finished_at)).where(
            rs.c.line == r.line, rs.c.id > r.id, rs.c.status.in_(("ready", "deleted")))
        .scalar_subquery(),
        select(func.max(tj.c.finished_at)).where(tj.c.reference_snapshot_id == r.id)
        .scalar_subquery(),
        select(func.max(ck.c.stage_changed_at)).where(
            (ck.c.reference_snapshot_id == r.id) | (ck.c.next_reference_id == r.id))
        .scalar_subquery())).one()]
    return max((t for t in times if t is not None), default=None)


def _snapshot_needed() -> Any:
    """SQL: some active job uses this snapshot, or a job whose model is still live (or not
    yet registered, so the gate still needs its π_ref), or a live checkpoint names it."""
    job_live = exists().where(ck.c.job_id == tj.c.id, ck.c.stage.in_(LIVE_STAGES))
    job_unregistered = and_(tj.c.status == "succeeded", ~exists().where(ck.c.job_id == tj.c.id))
    by_job = exists().where(tj.c.reference_snapshot_id == rs.c.id,
                            tj.c.status.in_(ACTIVE_JOB_STATUSES) | job_live | job_unregistered)
    by_ckpt = exists().where(
        ((ck.c.reference_snapshot_id == rs.c.id) | (ck.c.next_reference_id == rs.c.id)),
        ck.c.stage.in_(LIVE_STAGES))
    return by_job | by_ckpt


def _claim_folder(path: str) -> str | None:
    """Rename a folder that has no row to claim (resume states) to a unique sibling: of
    several cleanups running at once exactly one gets it and deletes it; the others find it
    gone (None) instead of deleting it under each other's feet."""
    claimed = f"{path}.removing-{secrets.token_hex(4)}"
    try:
        os.rename(path, claimed)
    except FileNotFoundError:
        return None
    return claimed


def _remove(paths: list[str]) -> None:
    for p in paths:
        remove_snapshot_files(p)  # also clears read-only bits


def apply(engine: Engine, settings: Settings, dry_run: bool = False,
          now: datetime | None = None,
          actor: registry.Actor = registry.RETENTION) -> RetentionReport:
    """Remove what :func:`plan` lists; each removal is claimed by a conditional UPDATE first,
    so a checkpoint promoted meanwhile (or a snapshot a new job picked) is skipped. ``actor``:
    who asked, for the audit trail (an API key's cleanup, or the beat task)."""
    now = now or _now()
    with engine.connect() as conn:
        items = plan(conn, settings, now)
    report = RetentionReport(dry_run)
    for item in items:
        if dry_run:
            report.removed.append(item)
            report.freed_bytes += item.bytes
            continue
        paths = item.paths
        with engine.begin() as conn:
            if item.kind == "checkpoint":
                ok = conn.execute(update(ck).where(
                    ck.c.id == item.id, ck.c.stage.in_(("retired", "rejected")),
                    ck.c.files_deleted_at.is_(None)).values(files_deleted_at=now)).rowcount
                if ok:
                    registry.record_event(conn, line=item.line, checkpoint_id=item.id,
                                          action="files_deleted", actor=actor,
                                          reason=item.reason,
                                          details={"paths": item.paths, "bytes": item.bytes})
            elif item.kind == "snapshot":
                # Lock the row first, then decide in a statement of its own: on Postgres that
                # statement sees a job retried meanwhile (service/job_retry.py locks the row
                # too); one UPDATE would judge "needed" on what it read before the wait.
                conn.execute(select(rs.c.id).where(rs.c.id == item.id).with_for_update())
                ok = conn.execute(update(rs).where(
                    rs.c.id == item.id, rs.c.status == "ready", ~_snapshot_needed())
                    .values(status="deleted")).rowcount
            else:
                # The job row is held (a write: also SQLite's lock) while the folder is claimed,
                # so a retry (job queued again) waits for it, or came first and it is skipped.
                statuses = (UNREGISTERED_JOB_STATUSES if item.kind == "unregistered_model"
                            else FINISHED_JOB_STATUSES)
                ok = conn.execute(update(tj).where(
                    tj.c.id == item.id, tj.c.status.in_(statuses),
                    tj.c.finished_at <= now - timedelta(seconds=settings.retention_min_age_s))
                    .values(finished_at=tj.c.finished_at)).rowcount
                if ok:
                    paths = [p for p in map(_claim_folder, item.paths) if p]
                    ok = len(paths)
        if not ok:
            continue
        _remove(paths)
        report.removed.append(item)
        report.freed_bytes += item.bytes
        log.info("retention: removed %s %s (%s bytes): %s", item.kind, item.id, item.bytes,
                 item.reason)
    return report


def disk_usage(conn: Connection, settings: Settings) -> dict[str, Any]:
    """Bytes under the artifacts root by what they are, and the filesystem's free space."""
    root = Path(settings.artifacts_root).expanduser().resolve()
    by_stage: dict[str, int] = {}
    counted: set[str] = set()
    for r in conn.execute(select(ck.c.stage, ck.c.artifact_path, ck.c.adapter_path)
                          .where(ck.c.files_deleted_at.is_(None))).all():
        for p in (r.artifact_path, r.adapter_path):
            if p and p not in counted:
                counted.add(p)
                by_stage[r.stage] = by_stage.get(r.stage, 0) + tree_bytes(p)
    snapshots = 0
    for r in conn.execute(select(rs.c.path).where(rs.c.status == "ready")).all():
        if r.path and r.path not in counted:
            counted.add(r.path)
            snapshots += tree_bytes(r.path)
    resume = 0
    jobs_root = root / "jobs"
    if jobs_root.is_dir():
        for states in jobs_root.glob("*/*/checkpoints"):
            resume += tree_bytes(states)
    total = tree_bytes(root)
    free = shutil.disk_usage(root).free if root.is_dir() else None
    known = sum(by_stage.values()) + snapshots + resume
    return {"artifacts_root": str(root), "total_bytes": total, "free_bytes": free,
            "checkpoints_by_stage": by_stage, "snapshots_bytes": snapshots,
            "resume_states_bytes": resume, "other_bytes": max(0, total - known)}
