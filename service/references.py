"""π_ref snapshot rows. The files are written by the worker (worker/snapshot.py); this module
owns the SQL: request, complete (deduplicated by content hash), fail, and the guarded delete.
"""

from __future__ import annotations

import secrets
import shutil
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, exists, or_, select, update
from sqlalchemy.exc import IntegrityError

from service.errors import ApiError
from service.models import reference_snapshots as rs
from service.models import training_jobs as tj


def request_snapshot(conn: Connection, line: str, source: str,
                     requested_by: int | None = None) -> dict[str, Any]:
    row = conn.execute(rs.insert().values(
        line=line, status="pending", source=source, requested_by=requested_by,
        created_at=datetime.now(UTC)).returning(*rs.c)).mappings().one()
    return dict(row)


def latest_ready(conn: Connection, line: str) -> dict[str, Any] | None:
    row = conn.execute(select(rs).where(rs.c.line == line, rs.c.status == "ready")
                       .order_by(rs.c.id.desc()).limit(1)).mappings().first()
    return dict(row) if row else None


def get_snapshot(conn: Connection, snapshot_id: int) -> dict[str, Any]:
    row = conn.execute(select(rs).where(rs.c.id == snapshot_id)).mappings().first()
    if row is None:
        raise ApiError(404, "not_found", f"snapshot {snapshot_id} does not exist",
                       [{"field": "snapshot_id", "message": "no such snapshot"}])
    return dict(row)


def complete_snapshot(conn: Connection, snapshot_id: int, content_hash: str, path: str,
                      size_bytes: int, token: str | None = None) -> dict[str, Any] | None:
    """Mark ready, or `unchanged` when the line's latest ready snapshot has the same content
    (the caller then discards its copy: ``same_as_id`` names the snapshot to use). None when the
    row is no longer pending, or ``token`` no longer holds it: another delivery of the same task
    decided or took it, and this one must leave its files alone. The UPDATE holds the row until
    the caller commits."""
    snap = get_snapshot(conn, snapshot_id)
    prev = latest_ready(conn, snap["line"])
    now = datetime.now(UTC)
    if prev is not None and prev["id"] != snapshot_id and prev["content_hash"] == content_hash:
        values: dict[str, Any] = {"status": "unchanged", "same_as_id": prev["id"],
                                  "content_hash": content_hash, "finished_at": now}
    else:
        values = {"status": "ready", "content_hash": content_hash, "path": path,
                  "size_bytes": size_bytes, "finished_at": now}
    if not conn.execute(update(rs).where(*_owned(snapshot_id, token)).values(**values)).rowcount:
        return None
    return get_snapshot(conn, snapshot_id)


def unheld(since: datetime) -> Any:
    """SQL: no delivery has heartbeated on the snapshot since ``since`` (nobody is copying it)."""
    return or_(rs.c.heartbeat_at.is_(None), rs.c.heartbeat_at < since)


def claim_snapshot(conn: Connection, snapshot_id: int, lease_s: float,
                   max_attempts: int | None = None) -> str | None:
    """Take a pending snapshot for this delivery: its token, or None while another delivery's
    heartbeat is more recent than ``lease_s`` (it is copying), when the row is decided, or when
    ``max_attempts`` deliveries claimed it already (the gate sweep then fails it). A later claim
    (after a heartbeat went stale) replaces the token: the earlier delivery can then neither
    complete nor fail the row."""
    now, token = datetime.now(UTC), secrets.token_hex(16)
    guard = [rs.c.id == snapshot_id, rs.c.status == "pending",
             unheld(now - timedelta(seconds=lease_s))]
    if max_attempts is not None:
        guard.append(rs.c.attempts < max_attempts)
    return token if conn.execute(update(rs).where(*guard).values(
        heartbeat_at=now, claim_token=token, attempts=rs.c.attempts + 1)).rowcount else None


def fail_exhausted(conn: Connection, snapshot_id: int, max_attempts: int, lease_s: float) -> bool:
    """Fail a pending snapshot that ``max_attempts`` deliveries claimed and whose last one
    stopped heartbeating (its worker died copying it, each time): re-sending it again would only
    repeat that, and a pending row can never be deleted. False when it is not such a row."""
    now = datetime.now(UTC)
    return bool(conn.execute(update(rs).where(
        rs.c.id == snapshot_id, rs.c.status == "pending", rs.c.attempts >= max_attempts,
        unheld(now - timedelta(seconds=lease_s)),
    ).values(status="failed", finished_at=now, claim_token=None,
             error=f"gave up after {max_attempts} attempts: the worker copying it stopped "
                   "heartbeating each time (PROSPECT_SNAPSHOT_MAX_ATTEMPTS)")).rowcount)


def _owned(snapshot_id: int, token: str | None) -> list[Any]:
    guard = [rs.c.id == snapshot_id, rs.c.status == "pending"]
    if token is not None:
        guard.append(rs.c.claim_token == token)
    return guard


def snapshot_heartbeat(conn: Connection, snapshot_id: int, token: str | None = None) -> None:
    conn.execute(update(rs).where(*_owned(snapshot_id, token)).values(heartbeat_at=datetime.now(UTC)))


def fail_snapshot(conn: Connection, snapshot_id: int, error: str, token: str | None = None) -> bool:
    """Mark a pending snapshot failed (held by ``token`` when given); False, and no change, when
    it was decided already or another delivery holds it now."""
    return bool(conn.execute(update(rs).where(*_owned(snapshot_id, token))
                             .values(status="failed", error=error[:4000],
                                     finished_at=datetime.now(UTC))).rowcount)


def list_snapshots(conn: Connection, line: str | None, limit: int) -> list[dict[str, Any]]:
    stmt = select(rs).order_by(rs.c.id.desc()).limit(limit)
    if line is not None:
        stmt = stmt.where(rs.c.line == line)
    return [dict(r) for r in conn.execute(stmt).mappings()]


def snapshot_in_use(conn: Connection, snapshot_id: int) -> bool:
    """Any job that used or will use it: its lineage must stay reproducible."""
    used = conn.execute(select(exists().where(tj.c.reference_snapshot_id == snapshot_id))
                        ).scalar_one()
    pointed = conn.execute(select(exists().where(rs.c.same_as_id == snapshot_id,
                                                 rs.c.id != snapshot_id))).scalar_one()
    return bool(used or pointed)


def delete_snapshot_row(conn: Connection, snapshot_id: int) -> dict[str, Any]:
    """Remove the row of an unused snapshot (the caller removes its folder after commit).
    409 while any job refers to it; the foreign key enforces the same in the database."""
    snap = get_snapshot(conn, snapshot_id)
    in_use = ApiError(409, "snapshot_in_use",
                      f"snapshot {snapshot_id} is the π_ref of a job and is kept",
                      [{"field": "snapshot_id", "message": "the reference of a job"}])
    if snapshot_in_use(conn, snapshot_id):
        raise in_use
    if snap["status"] == "pending":
        raise ApiError(409, "snapshot_pending", f"snapshot {snapshot_id} is still being taken",
                       [{"field": "snapshot_id", "message": "still being taken; retry when it is ready"}])
    try:
        conn.execute(rs.delete().where(rs.c.id == snapshot_id,
                                       or_(rs.c.status != "pending", rs.c.status.is_(None))))
    except IntegrityError:  # a job picked it after the check above: the foreign key says so
        raise in_use from None
    return snap


def remove_snapshot_files(path: str | Path) -> None:
    """Delete a snapshot folder (its files are read-only by design)."""
    path = Path(path)
    if not path.exists():
        return
    for p in path.rglob("*"):
        if p.is_file():
            p.chmod(stat.S_IWUSR | stat.S_IRUSR)
    shutil.rmtree(path)
