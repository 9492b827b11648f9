"""The checkpoint registry: lineage, stages, promotion, rollback, and what to serve.

    job succeeded ─▶ pending ──gate──▶ candidate ──promote(canary, p%)──▶ canary
                        └──gate──▶ rejected      │                         │  ▲ promote(canary, q%)
                                                 └──promote(production)──▶ production ◀─┘ (or guard)
                                                                              │
                          rollback: production ─▶ rejected, previous production (or the base
                          model) serves again; canary ─▶ rejected.  A newer production retires
                          the old one; a retired checkpoint whose files are kept may be
                          promoted again.  reject (a person): pending or candidate ─▶ rejected;
                          a running evaluation stops within seconds.

* Stages live in the database and every change is a conditional UPDATE (``WHERE stage =
  <what the caller saw>``), so two processes acting on one checkpoint cannot both win. Two
  production (or two canary) checkpoints of one line are impossible: partial unique indexes.
* Every change appends a ``rollout_events`` row (who, from, to, why) in the same transaction;
  the table refuses UPDATE and DELETE (triggers).
* Versions: a checkpoint is served and echoed in feedback as ``"<line>-ckpt-<id>"``; before
  any promotion (or after rolling back past the first one) the line serves its base model as
  ``"<line>-base"``. Both names are stable, so feedback attributes to exactly one model.
* When a checkpoint becomes production (promotion or rollback), a π_ref snapshot of it is
  requested in the same transaction: the line's next jobs train against it.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Connection, Engine, exists, select, update
from sqlalchemy.exc import IntegrityError

from service import notify
from service.canary import choose_version
from service.db import newest_first
from service.errors import ApiError
from service.jobs import get_job, json_safe, selection_for
from service.lines import base_version, checkpoint_version, get_line
from service.models import checkpoints as ck
from service.models import model_lines as ml
from service.models import reference_snapshots as rs
from service.models import rollout_events as ev
from service.models import training_jobs as tj
from service.references import fail_exhausted, request_snapshot, unheld
from service.selection import iter_selected
from service.settings import Settings

_REASON_LIMIT = 4000


model_version = checkpoint_version  # "<line>-ckpt-<id>" (service.lines names versions)


@dataclass(frozen=True)
class Actor:
    """Who made a change, as the audit trail records it."""

    name: str
    key_id: int | None = None

    @classmethod
    def key(cls, key_id: int) -> Actor:
        return cls(f"key:{key_id}", key_id)


GATE = Actor("gate")
GUARD = Actor("guard")
RETENTION = Actor("retention")
SYSTEM = Actor("system")


def _now() -> datetime:
    return datetime.now(UTC)


def _conflict(error: str, message: str, field_: str = "stage") -> ApiError:
    return ApiError(409, error, message, [{"field": field_, "message": message}])


def record_event(conn: Connection, *, line: str, checkpoint_id: int | None, action: str,
                 actor: Actor, from_stage: str | None = None, to_stage: str | None = None,
                 canary_percent: float | None = None, reason: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
    conn.execute(ev.insert().values(
        line=line, checkpoint_id=checkpoint_id, action=action, from_stage=from_stage,
        to_stage=to_stage, canary_percent=canary_percent, actor=actor.name,
        key_id=actor.key_id, reason=reason[:_REASON_LIMIT] if reason else None,
        details=details, created_at=_now()))


def _payload(row: dict[str, Any], actor: Actor, reason: str | None, **extra: Any
             ) -> dict[str, Any]:
    return {"line": row["line"], "checkpoint_id": row["id"],
            "model_version": row["model_version"], "job_id": row["job_id"],
            "actor": actor.name, "reason": reason, **extra}


# ---- reading

def get_checkpoint(conn: Connection, checkpoint_id: int) -> dict[str, Any]:
    row = conn.execute(select(ck).where(ck.c.id == checkpoint_id)).mappings().first()
    if row is None:
        raise ApiError(404, "not_found", f"checkpoint {checkpoint_id} does not exist",
                       [{"field": "checkpoint_id", "message": "no such checkpoint"}])
    return dict(row)


def checkpoint_for_job(conn: Connection, job_id: int) -> dict[str, Any] | None:
    row = conn.execute(select(ck).where(ck.c.job_id == job_id)).mappings().first()
    return dict(row) if row else None


def in_stage(conn: Connection, line: str, stage: str) -> dict[str, Any] | None:
    row = conn.execute(select(ck).where(ck.c.line == line, ck.c.stage == stage)
                       .order_by(ck.c.id.desc()).limit(1)).mappings().first()
    return dict(row) if row else None


def production_source(conn: Connection, settings: Settings, line: str) -> str:
    """What the line serves to everyone outside a canary, as a model folder or id: the
    production checkpoint's folder, else the base model. π_ref snapshots are taken of it."""
    base = str(get_line(conn, line, settings)["base_model"])
    prod = in_stage(conn, line, "production")
    return str(prod["artifact_path"]) if prod and prod["artifact_path"] else base


def list_checkpoints(conn: Connection, *, line: str | None, stage: str | None, limit: int,
                     before_id: int | None) -> list[dict[str, Any]]:
    return newest_first(conn, ck, limit=limit, before_id=before_id, line=line, stage=stage)


def lineage(conn: Connection, row: dict[str, Any], limit: int = 100) -> list[dict[str, Any]]:
    """The chain this checkpoint descends from, newest first, ending at the base model:
    each step names the job, its data range and the π_ref snapshot it trained against."""
    chain: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = row
    seen: set[int] = set()
    while cur is not None and cur["id"] not in seen and len(chain) < limit:
        seen.add(cur["id"])
        job = conn.execute(select(tj.c.id, tj.c.min_event_id, tj.c.max_event_id,
                                  tj.c.n_desirable, tj.c.n_undesirable, tj.c.lambda_d,
                                  tj.c.lambda_u, tj.c.data)
                           .where(tj.c.id == cur["job_id"])).mappings().first()
        snap = conn.execute(select(rs.c.id, rs.c.source, rs.c.content_hash)
                            .where(rs.c.id == cur["reference_snapshot_id"])).mappings().first()
        chain.append({
            "checkpoint_id": cur["id"], "model_version": cur["model_version"],
            "stage": cur["stage"], "job_id": cur["job_id"],
            "data": None if job is None else {
                "min_event_id": job["min_event_id"], "max_event_id": job["max_event_id"],
                "n_desirable": job["n_desirable"], "n_undesirable": job["n_undesirable"],
                "lambda_d": job["lambda_d"], "lambda_u": job["lambda_u"],
                "event_ids_sha256": (job["data"] or {}).get("event_ids_sha256")},
            "reference": None if snap is None else dict(snap),
        })
        parent = cur["parent_id"]
        cur = (dict(conn.execute(select(ck).where(ck.c.id == parent)).mappings().one())
               if parent is not None else None)
    chain.append({"base_model": row["base_model"], "model_version": base_version(row["line"])})
    return chain


def list_events(conn: Connection, *, line: str | None, checkpoint_id: int | None, limit: int,
                before_id: int | None) -> list[dict[str, Any]]:
    return newest_first(conn, ev, limit=limit, before_id=before_id, line=line, checkpoint_id=checkpoint_id)


# ---- registration and the gate's bookkeeping

def _folder_bytes(*paths: str | None) -> int | None:
    total, seen = 0, False
    for p in paths:
        if not p or not os.path.isdir(p):
            continue
        seen = True
        for root, _dirs, files in os.walk(p):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total if seen else None


def ensure_pending(engine: Engine, settings: Settings, job_id: int) -> dict[str, Any] | None:
    """Register a succeeded job's model (once: the job id is unique) as ``pending`` for the
    gate; a job that wrote no final model is registered ``rejected``. None when the job has
    not succeeded."""
    with engine.connect() as conn:
        found = checkpoint_for_job(conn, job_id)
    if found is not None:
        return found
    try:
        with engine.begin() as conn:
            job = get_job(conn, job_id)
            if job["status"] != "succeeded":
                return None
            result = job["result"] or {}
            base = conn.execute(select(ml.c.base_model).where(ml.c.name == job["line"])
                                ).scalar_one()
            parent = None
            if job["reference_snapshot_id"] is not None:
                source = conn.execute(select(rs.c.source).where(
                    rs.c.id == job["reference_snapshot_id"])).scalar_one()
                parent = conn.execute(select(ck.c.id).where(
                    ck.c.line == job["line"], ck.c.artifact_path == source)
                    .order_by(ck.c.id.desc()).limit(1)).scalar_one_or_none()
            final_dir, adapter_dir = result.get("final_dir"), result.get("adapter_dir")
            now = _now()
            stage = "pending" if final_dir else "rejected"
            reason = None if final_dir else "the job wrote no final model"
            row_id = conn.execute(ck.insert().values(
                line=job["line"], model_version=f"pending-{secrets.token_hex(12)}",
                job_id=job_id, reference_snapshot_id=job["reference_snapshot_id"],
                parent_id=parent, base_model=base, artifact_path=final_dir,
                adapter_path=adapter_dir, format="lora" if adapter_dir else "full",
                manifest_sha256=result.get("manifest_sha256"),
                size_bytes=_folder_bytes(final_dir, adapter_dir), stage=stage,
                reason=reason, created_at=now, stage_changed_at=now,
            ).returning(ck.c.id)).scalar_one()
            conn.execute(update(ck).where(ck.c.id == row_id)
                         .values(model_version=model_version(job["line"], row_id)))
            record_event(conn, line=job["line"], checkpoint_id=row_id, action="registered",
                         actor=SYSTEM, to_stage=stage, reason=reason,
                         details={"job_id": job_id, "final_dir": final_dir,
                                  "adapter_dir": adapter_dir})
            row = get_checkpoint(conn, row_id)
            if stage == "rejected":
                notify.enqueue(conn, settings, "gate_rejected", _payload(row, GATE, reason),
                               f"gate_rejected:{row_id}")
            return row
    except IntegrityError:  # another process registered this job first
        with engine.connect() as conn:
            return checkpoint_for_job(conn, job_id)


def mark_gate_sent(engine: Engine, checkpoint_id: int) -> None:
    with engine.begin() as conn:
        conn.execute(update(ck).where(ck.c.id == checkpoint_id, ck.c.stage == "pending")
                     .values(gate_sent_at=_now()))


def claim_gate(engine: Engine, settings: Settings, checkpoint_id: int) -> str | None:
    """Take the evaluation of a pending checkpoint for this attempt: a token fences its later
    writes. None when it is decided, being evaluated, or out of attempts."""
    token = secrets.token_hex(16)
    with engine.begin() as conn:
        done = conn.execute(update(ck).where(
            ck.c.id == checkpoint_id, ck.c.stage == "pending", ck.c.gate_token.is_(None),
            ck.c.gate_attempts < settings.gate_max_attempts,
        ).values(gate_token=token, gate_attempts=ck.c.gate_attempts + 1,
                 gate_heartbeat_at=_now())).rowcount
    return token if done == 1 else None


def gate_heartbeat(engine: Engine, checkpoint_id: int, token: str) -> bool:
    with engine.begin() as conn:
        return conn.execute(update(ck).where(ck.c.id == checkpoint_id,
                                             ck.c.gate_token == token, ck.c.stage == "pending")
                            .values(gate_heartbeat_at=_now())).rowcount == 1


def release_gate(engine: Engine, settings: Settings, checkpoint_id: int, token: str | None,
                 error: str) -> dict[str, Any]:
    """An evaluation attempt ended without a decision: free the row for another attempt, or
    reject the checkpoint once ``gate_max_attempts`` are used (it cannot be judged, so it is
    not promoted on faith)."""
    with engine.begin() as conn:
        guard = [ck.c.id == checkpoint_id, ck.c.stage == "pending"]
        if token is not None:
            guard.append(ck.c.gate_token == token)
        conn.execute(update(ck).where(*guard).values(gate_token=None,
                                                     gate_error=error[-_REASON_LIMIT:]))
        row = get_checkpoint(conn, checkpoint_id)
    return reject_exhausted(engine, settings, checkpoint_id) or row


def reject_exhausted(engine: Engine, settings: Settings, checkpoint_id: int) -> dict[str, Any] | None:
    """Reject a pending checkpoint that no attempt holds and none is left for: release_gate
    frees the token and rejects in two transactions, and when the second never ran (database
    blip, worker killed) nothing else would ever decide it. None when it is not such a row."""
    with engine.connect() as conn:
        row = get_checkpoint(conn, checkpoint_id)
    if (row["stage"] != "pending" or row["gate_token"] is not None
            or row["gate_attempts"] < settings.gate_max_attempts):
        return None
    error = row["gate_error"] or "no evaluation attempt finished"
    return record_gate(engine, settings, checkpoint_id, None, passed=False,
                       metrics={"error": error[-_REASON_LIMIT:]},
                       reason=f"evaluation failed {row['gate_attempts']} times: {error[-500:]}")


def record_gate(engine: Engine, settings: Settings, checkpoint_id: int, token: str | None,
                *, passed: bool, metrics: dict[str, Any], reason: str | None
                ) -> dict[str, Any] | None:
    """Write the gate's decision (fenced by the attempt's token); None when another attempt
    or a person already decided. A pass may start a canary (PROSPECT_AUTO_CANARY_PERCENT)."""
    stage = "candidate" if passed else "rejected"
    metrics = json_safe(metrics)  # a diverged model's NaN scores: Postgres refuses them in JSON
    with engine.begin() as conn:
        guard = [ck.c.id == checkpoint_id, ck.c.stage == "pending"]
        guard.append(ck.c.gate_token == token if token is not None else ck.c.gate_token.is_(None))
        now = _now()
        if conn.execute(update(ck).where(*guard).values(
                stage=stage, metrics=metrics, reason=reason, evaluated_at=now,
                stage_changed_at=now, gate_token=None)).rowcount != 1:
            return None
        row = get_checkpoint(conn, checkpoint_id)
        record_event(conn, line=row["line"], checkpoint_id=checkpoint_id,
                     action="passed" if passed else "rejected", actor=GATE,
                     from_stage="pending", to_stage=stage, reason=reason,
                     details={"checks": metrics.get("checks")})
        notify.enqueue(conn, settings, "gate_passed" if passed else "gate_rejected",
                       _payload(row, GATE, reason, checks=metrics.get("checks")),
                       f"gate:{checkpoint_id}")
    if passed and settings.auto_canary_percent > 0:
        try:
            row = promote(engine, settings, checkpoint_id, "canary",
                          settings.auto_canary_percent, GATE,
                          reason="passed the gate (PROSPECT_AUTO_CANARY_PERCENT)",
                          expect_stage="candidate").checkpoint
        except ApiError:
            pass  # a canary already runs, or a person acted on it meanwhile: ops decide
    return row


def holdout_examples(conn: Connection, settings: Settings, job: dict[str, Any]
                     ) -> list[dict[str, Any]]:
    """The held-out events the gate scores: the split no job ever trains on (a hash of
    event_id, see service.selection), within the job's filters and its line's feedback scope
    (frozen with the job), the most recent ones."""
    sel = replace(selection_for(job, settings), split="holdout")
    if settings.gate_holdout_scope == "all":
        sel = replace(sel, filters=replace(sel.filters, min_id=None))
    # A job that learns from user corrections is scored on held-out corrections too.
    rows = list(iter_selected(conn, sel, corrections=bool(job["filters"].get("corrections"))))
    rows = rows[-settings.gate_max_holdout_examples:]
    return [{"prompt": r["prompt"], "completion": r["completion"], "label": r["label"]}
            for r in rows]


# ---- promotion and rollback

@dataclass
class Change:
    checkpoint: dict[str, Any] | None
    #: The checkpoint that stopped serving (retired or rolled back), if any.
    previous: dict[str, Any] | None = None
    #: A pending π_ref snapshot of the new production model: send it to a worker.
    snapshot_id: int | None = None
    #: The production version after a production change or rollback; the canary's otherwise.
    version: str | None = None
    #: reject: the stage it left, and whether an evaluation attempt held it (it stops
    #: within seconds).
    from_stage: str | None = None
    evaluation_running: bool = False


_PROMOTABLE = {"canary": ("candidate", "retired", "canary"),
               "production": ("candidate", "canary", "retired")}


def _check_promotable(row: dict[str, Any], target: str) -> None:
    if row["files_deleted_at"] is not None:
        raise _conflict("files_deleted", f"checkpoint {row['id']}'s files were removed by "
                        "retention; it cannot serve again", "checkpoint_id")
    if row["stage"] == target == "production":
        raise _conflict("already_production", f"checkpoint {row['id']} is already production")
    if row["stage"] not in _PROMOTABLE[target]:
        why = {"pending": "it has not passed the evaluation gate yet",
               "rejected": f"it was rejected: {row['reason']}",
               "production": "it is production; roll back or promote another instead"
               }.get(row["stage"], "")
        raise _conflict("not_promotable",
                        f"stage: checkpoint {row['id']} is {row['stage']}; {why}".rstrip("; "))


def promote(engine: Engine, settings: Settings, checkpoint_id: int,
            target: Literal["canary", "production"], percent: float | None, actor: Actor,
            reason: str | None = None, expect_stage: str | None = None) -> Change:
    """Start or re-weight a canary, or make a checkpoint production (the old production is
    retired and a π_ref snapshot of the new one is requested). 409 naming the field when the
    checkpoint's stage does not allow it or another process changed the line meanwhile.
    ``expect_stage``: 409 unless the checkpoint is still in that stage (a decision taken on an
    earlier reading, as the live guard's, must not promote a checkpoint that has moved since)."""
    if target == "canary" and (percent is None or not 0.0 < percent <= 100.0):
        raise ApiError(422, "invalid", "percent: a canary needs a percentage in (0, 100]",
                       [{"field": "percent", "message": "must be in (0, 100]"}])
    line = ""
    try:
        with engine.begin() as conn:
            row = get_checkpoint(conn, checkpoint_id)
            if expect_stage is not None and row["stage"] != expect_stage:
                raise _conflict("stage_changed", f"stage: checkpoint {checkpoint_id} is {row['stage']} now, "
                                f"not {expect_stage}", "checkpoint_id")
            _check_promotable(row, target)
            line, now = row["line"], _now()
            if target == "canary":
                return _to_canary(conn, settings, row, float(percent or 0.0), actor, reason)
            old = in_stage(conn, line, "production")
            if old is not None and conn.execute(update(ck).where(
                    ck.c.id == old["id"], ck.c.stage == "production").values(
                    stage="retired", canary_percent=None, stage_changed_at=now)).rowcount != 1:
                raise _production_conflict(line)
            snap = request_snapshot(conn, line, str(row["artifact_path"]), actor.key_id)
            if conn.execute(update(ck).where(
                    ck.c.id == row["id"], ck.c.stage == row["stage"],
                    ck.c.files_deleted_at.is_(None)).values(
                    stage="production", canary_percent=None, stage_changed_at=now,
                    previous_production_id=old["id"] if old else None,
                    next_reference_id=snap["id"])).rowcount != 1:
                raise _production_conflict(line)
            if old is not None:
                record_event(conn, line=line, checkpoint_id=old["id"], action="retired",
                             actor=actor, from_stage="production", to_stage="retired",
                             reason=f"replaced by checkpoint {row['id']}")
            record_event(conn, line=line, checkpoint_id=row["id"], action="production",
                         actor=actor, from_stage=row["stage"], to_stage="production",
                         reason=reason,
                         details={"previous_production_id": old["id"] if old else None,
                                  "reference_snapshot_id": snap["id"]})
            new = get_checkpoint(conn, row["id"])
            notify.enqueue(conn, settings, "promoted", _payload(
                new, actor, reason, stage="production",
                previous=old["model_version"] if old else base_version(line)))
            prev = get_checkpoint(conn, old["id"]) if old else None
            return Change(new, prev, snap["id"], new["model_version"])
    except IntegrityError:
        raise _production_conflict(line) from None


def _production_conflict(line: str) -> ApiError:
    return _conflict("production_conflict",
                     f"stage: line {line!r} changed production meanwhile; reload and retry")


def _to_canary(conn: Connection, settings: Settings, row: dict[str, Any], percent: float,
               actor: Actor, reason: str | None) -> Change:
    line = row["line"]
    if row["stage"] == "canary":
        if conn.execute(update(ck).where(ck.c.id == row["id"], ck.c.stage == "canary")
                        .values(canary_percent=percent)).rowcount != 1:
            # rolled back or promoted since it was read: no event, no 200 for a dead canary
            raise _conflict("stage_changed", f"stage: checkpoint {row['id']} is no longer a "
                            "canary; reload")
        record_event(conn, line=line, checkpoint_id=row["id"], action="canary_percent",
                     actor=actor, from_stage="canary", to_stage="canary",
                     canary_percent=percent, reason=reason,
                     details={"previous_percent": row["canary_percent"]})
        return Change(get_checkpoint(conn, row["id"]), version=row["model_version"])
    active = in_stage(conn, line, "canary")
    if active is not None:
        raise _conflict("canary_active",
                        f"stage: line {line!r} already runs checkpoint {active['id']} as a "
                        "canary; promote or roll it back first")
    now = _now()
    # No savepoint: the caller's transaction is rolled back on the 409 anyway, and with pysqlite
    # the RELEASE of a first savepoint commits, so the stage change would outlive a failure of
    # the audit row or the notification below.
    try:
        done = conn.execute(update(ck).where(
            ck.c.id == row["id"], ck.c.stage == row["stage"],
            ck.c.files_deleted_at.is_(None)).values(
            stage="canary", canary_percent=percent, stage_changed_at=now)).rowcount
    except IntegrityError:  # another canary of the line won the partial unique index
        done = 0
    if done != 1:
        raise _conflict("canary_active",
                        f"stage: line {line!r} started another canary meanwhile; reload")
    record_event(conn, line=line, checkpoint_id=row["id"], action="canary", actor=actor,
                 from_stage=row["stage"], to_stage="canary", canary_percent=percent,
                 reason=reason)
    new = get_checkpoint(conn, row["id"])
    notify.enqueue(conn, settings, "canary_started",
                   _payload(new, actor, reason, stage="canary", percent=percent))
    return Change(new, version=new["model_version"])


def _rollback_target(conn: Connection, current: dict[str, Any]) -> dict[str, Any] | None:
    """The previous production whose files are still there and that was not itself rolled
    back; None: the base model."""
    seen = {current["id"]}
    nxt = current["previous_production_id"]
    while nxt is not None and nxt not in seen:
        seen.add(nxt)
        cand = get_checkpoint(conn, nxt)
        if cand["stage"] not in ("rejected", "production") and cand["files_deleted_at"] is None:
            return cand
        nxt = cand["previous_production_id"]
    return None


#: Stages a person may reject: never served. Canary and production go through rollback.
REJECTABLE = ("pending", "candidate")
_NOT_REJECTABLE = {"canary": "roll the canary back instead (POST /v1/rollback)",
                   "production": "roll it back instead (POST /v1/rollback)",
                   "retired": "it no longer serves", "rejected": "it is already rejected"}


def reject(engine: Engine, settings: Settings, checkpoint_id: int, actor: Actor,
           reason: str | None = None) -> Change:
    """Reject a checkpoint that never served: ``candidate``, or ``pending`` with its evaluation
    queued or running. A queued evaluation then never claims the row; a running one sees the
    stage change within seconds (worker.gate polls it) and stops its child, and its late
    verdict is fenced out (record_gate, release_gate and the heartbeat all require
    ``stage = 'pending'``). The UPDATE is conditional on the stage read, so a gate verdict or
    a promotion landing meanwhile makes it a 409 rather than being overwritten."""
    why = reason or f"rejected by {actor.name}"
    with engine.begin() as conn:
        row = get_checkpoint(conn, checkpoint_id)
        if row["stage"] not in REJECTABLE:
            raise _conflict("not_rejectable", f"stage: checkpoint {checkpoint_id} is "
                            f"{row['stage']}; {_NOT_REJECTABLE.get(row['stage'], '')}".rstrip("; "))
        running = row["stage"] == "pending" and row["gate_token"] is not None
        if conn.execute(update(ck).where(ck.c.id == checkpoint_id, ck.c.stage == row["stage"])
                        .values(stage="rejected", canary_percent=None, reason=why,
                                stage_changed_at=_now(), gate_token=None)).rowcount != 1:
            raise _conflict("stage_changed", f"stage: checkpoint {checkpoint_id} is no longer "
                            f"{row['stage']}; reload")
        record_event(conn, line=row["line"], checkpoint_id=checkpoint_id, action="rejected",
                     actor=actor, from_stage=row["stage"], to_stage="rejected", reason=why,
                     details={"evaluation_running": running, "gate_attempts": row["gate_attempts"]})
        new = get_checkpoint(conn, checkpoint_id)
        notify.enqueue(conn, settings, "rejected", _payload(
            new, actor, why, from_stage=row["stage"], evaluation_running=running),
            f"rejected:{checkpoint_id}")
    return Change(new, version=new["model_version"], from_stage=row["stage"],
                  evaluation_running=running)


def gate_should_stop(engine: Engine, checkpoint_id: int, token: str) -> bool:
    """Whether a running evaluation attempt should stop: the checkpoint was rejected (or
    otherwise decided) or another attempt holds it. A cheap read, polled every few seconds."""
    with engine.connect() as conn:
        row = conn.execute(select(ck.c.stage, ck.c.gate_token).where(ck.c.id == checkpoint_id)
                           ).first()
    return row is None or row.stage != "pending" or row.gate_token != token


def rollback(engine: Engine, settings: Settings, line: str, actor: Actor,
             target: Literal["production", "canary"] = "production",
             reason: str | None = None, expect_id: int | None = None) -> Change:
    """``production``: the production checkpoint is rejected and the previous production (or
    the base model) serves again, with a π_ref snapshot of it requested. ``canary``: the
    canary is rejected; its users go back to production. ``expect_id`` makes it conditional
    (the guard rolls back only the canary it judged)."""
    why = reason or "rolled back"
    with engine.begin() as conn:
        get_line(conn, line, settings)
        cur = in_stage(conn, line, target)
        if cur is None or (expect_id is not None and cur["id"] != expect_id):
            what = ("canary" if target == "canary"
                    else "production checkpoint (it serves its base model)")
            raise _conflict(f"no_{target}", f"line: {line!r} has no {what} to roll back",
                            "line")
        now = _now()
        if conn.execute(update(ck).where(ck.c.id == cur["id"], ck.c.stage == target).values(
                stage="rejected", canary_percent=None, reason=why,
                stage_changed_at=now)).rowcount != 1:
            raise _conflict("rollback_conflict", f"line: {line!r} changed meanwhile; retry",
                            "line")
        record_event(conn, line=line, checkpoint_id=cur["id"], action="rollback", actor=actor,
                     from_stage=target, to_stage="rejected", reason=why)
        cur = get_checkpoint(conn, cur["id"])
        if target == "canary":
            prod = in_stage(conn, line, "production")
            version = prod["model_version"] if prod else base_version(line)
            notify.enqueue(conn, settings, "rolled_back", _payload(
                cur, actor, why, stage="canary", serving=version))
            return Change(None, cur, None, version)
        back = _rollback_target(conn, cur)
        if back is not None:
            snap = request_snapshot(conn, line, str(back["artifact_path"]), actor.key_id)
            if conn.execute(update(ck).where(ck.c.id == back["id"],
                                             ck.c.stage == back["stage"],
                                             ck.c.files_deleted_at.is_(None)).values(
                    stage="production", canary_percent=None, stage_changed_at=now,
                    next_reference_id=snap["id"])).rowcount != 1:
                raise _conflict("rollback_conflict",
                                f"line: {line!r} changed meanwhile; retry", "line")
            record_event(conn, line=line, checkpoint_id=back["id"], action="production",
                         actor=actor, from_stage=back["stage"], to_stage="production",
                         reason=f"rollback from checkpoint {cur['id']}",
                         details={"reference_snapshot_id": snap["id"]})
            back = get_checkpoint(conn, back["id"])
            version = back["model_version"]
        else:
            source = str(get_line(conn, line, settings)["base_model"])
            snap = request_snapshot(conn, line, source, actor.key_id)
            version = base_version(line)
        notify.enqueue(conn, settings, "rolled_back", _payload(
            cur, actor, why, stage="production", serving=version))
        return Change(back, cur, snap["id"], version)


# ---- serving

@dataclass(frozen=True)
class Serving:
    """A line's live versions, as the serving call needs them."""

    line: str
    production_version: str
    production_id: int | None
    production_path: str
    canary_version: str | None
    canary_id: int | None
    canary_path: str | None
    canary_percent: float

    def choose(self, user_key: str | None) -> dict[str, Any]:
        version = choose_version(user_key, self.production_version, self.canary_version,
                                 self.canary_percent, salt=self.canary_version or "")
        canary = self.canary_version is not None and version == self.canary_version
        arm = "canary" if canary else ("production" if self.production_id else "base")
        return {"line": self.line, "model_version": version, "arm": arm,
                "checkpoint_id": self.canary_id if canary else self.production_id,
                "model_path": self.canary_path if canary else self.production_path,
                "canary_percent": self.canary_percent if self.canary_version else 0.0}


def serving_state(conn: Connection, settings: Settings, line: str) -> Serving:
    base = str(get_line(conn, line, settings)["base_model"])
    rows = conn.execute(select(ck.c.id, ck.c.stage, ck.c.model_version, ck.c.artifact_path,
                               ck.c.canary_percent)
                        .where(ck.c.line == line, ck.c.stage.in_(("production", "canary")))
                        ).all()
    prod = next((r for r in rows if r.stage == "production"), None)
    can = next((r for r in rows if r.stage == "canary"), None)
    return Serving(
        line=line,
        production_version=prod.model_version if prod else base_version(line),
        production_id=prod.id if prod else None,
        production_path=prod.artifact_path if prod else base,
        canary_version=can.model_version if can else None,
        canary_id=can.id if can else None, canary_path=can.artifact_path if can else None,
        canary_percent=float(can.canary_percent or 0.0) if can else 0.0)


class ServingCache:
    """Per-process cache of each line's Serving for ``ttl_s`` seconds: the serving call is
    on every frontend request. A promotion or rollback reaches every process within it."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl = ttl_s
        self._items: dict[str, tuple[float, Serving]] = {}
        self._lock = threading.Lock()

    def get(self, engine: Engine, settings: Settings, line: str) -> Serving:
        hit = self._items.get(line)
        if hit is not None and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        with engine.begin() as conn:
            state = serving_state(conn, settings, line)
        if self.ttl > 0:
            with self._lock:
                if len(self._items) > 1000:
                    self._items.clear()
                self._items[line] = (time.monotonic(), state)
        return state

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


# ---- the sweep: evaluations that were never sent, lost, or are due again

@dataclass
class GateSweep:
    #: Job ids whose evaluation should be sent to the gpu queue.
    to_send: list[int] = field(default_factory=list)
    registered: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    #: Pending π_ref snapshots to (re)send to a worker: their message was lost or their worker
    #: stopped heartbeating.
    snapshots: list[int] = field(default_factory=list)
    #: Pending π_ref snapshots failed after PROSPECT_SNAPSHOT_MAX_ATTEMPTS deliveries.
    snapshots_failed: list[int] = field(default_factory=list)


def gate_sweep(engine: Engine, settings: Settings, now: datetime | None = None) -> GateSweep:
    """Find succeeded jobs with no checkpoint row, evaluations whose worker was lost, and
    evaluations sent long ago with no answer; register and re-send them (an evaluation only
    runs by claiming the row, so a duplicate message is harmless). Likewise pending π_ref
    snapshots whose message or worker was lost: re-sent, or failed once out of attempts."""
    now = now or _now()
    out = GateSweep()
    with engine.connect() as conn:
        unregistered = conn.execute(select(tj.c.id).where(
            tj.c.status == "succeeded", ~exists().where(ck.c.job_id == tj.c.id))
            .order_by(tj.c.id)).scalars().all()
    for job_id in unregistered:
        row = ensure_pending(engine, settings, job_id)
        if row is not None:
            out.registered.append(row["id"])
    stale = now - timedelta(seconds=settings.gate_heartbeat_timeout_s)
    with engine.connect() as conn:
        lost = conn.execute(select(ck.c.id, ck.c.gate_token).where(
            ck.c.stage == "pending", ck.c.gate_token.is_not(None),
            ck.c.gate_heartbeat_at < stale)).all()
    for r in lost:
        row = release_gate(engine, settings, r.id, r.gate_token,
                           "evaluation lost: no heartbeat since the worker took it")
        (out.rejected if row["stage"] == "rejected" else out.lost).append(r.id)
    resend = now - timedelta(seconds=settings.gate_resend_after_s)
    with engine.connect() as conn:
        due = conn.execute(select(ck.c.id, ck.c.job_id, ck.c.gate_sent_at, ck.c.gate_attempts).where(
            ck.c.stage == "pending", ck.c.gate_token.is_(None),
            (ck.c.gate_sent_at.is_(None)) | (ck.c.gate_sent_at < resend))).all()
        # Every pending snapshot, not only production's: one requested by POST /v1/references
        # or a rollback to the base model otherwise stayed pending (and undeletable) forever
        # once its message or its worker was lost. Not while a worker's heartbeat says it is
        # copying it (a large model takes a while).
        copying = now - timedelta(seconds=settings.heartbeat_timeout_s)
        snaps = conn.execute(select(rs.c.id, rs.c.attempts).where(
            rs.c.status == "pending", rs.c.created_at < resend,
            unheld(copying))
            .order_by(rs.c.id)).all()
    for r in due:
        if r.gate_attempts >= settings.gate_max_attempts:
            if reject_exhausted(engine, settings, r.id) is not None:
                out.rejected.append(r.id)
            continue
        same = (ck.c.gate_sent_at.is_(None) if r.gate_sent_at is None
                else ck.c.gate_sent_at == r.gate_sent_at)
        with engine.begin() as conn:
            if conn.execute(update(ck).where(ck.c.id == r.id, ck.c.stage == "pending", same)
                            .values(gate_sent_at=now)).rowcount and r.job_id is not None:
                out.to_send.append(r.job_id)
    for snap in snaps:
        if snap.attempts < settings.snapshot_max_attempts:
            out.snapshots.append(snap.id)
            continue
        with engine.begin() as conn:
            if fail_exhausted(conn, snap.id, settings.snapshot_max_attempts,
                              settings.heartbeat_timeout_s):
                out.snapshots_failed.append(snap.id)
    return out

