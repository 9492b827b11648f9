"""Retention removes the files of retired/rejected checkpoints and unused snapshots past the
count (or age), never anything production, a canary, a candidate, a pending evaluation or an
active job needs; disk usage is visible over HTTP."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import update

from service import registry, retention
from service.models import checkpoints, reference_snapshots


def _snapshot(reg, name: str, size: int = 2048, age_s: float = 0.0) -> tuple[int, Path]:
    path = Path(reg.settings.artifacts_root) / "references" / reg.line / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(os.urandom(size))
    when = datetime.now(UTC) - timedelta(seconds=age_s)
    with reg.engine.begin() as conn:
        sid = conn.execute(reference_snapshots.insert().values(
            line=reg.line, status="ready", source=str(reg.base), content_hash=name * 2,
            path=str(path), size_bytes=size, created_at=when, finished_at=when,
        ).returning(reference_snapshots.c.id)).scalar_one()
    return sid, path


def _promote(reg, cid, stage="production", percent=None):
    return registry.promote(reg.engine, reg.settings, cid, stage, percent, registry.Actor.key(1))


def _reject(reg) -> dict:
    row = registry.ensure_pending(reg.engine, reg.settings, reg.job())
    return registry.record_gate(reg.engine, reg.settings, row["id"], None, passed=False,
                                metrics={}, reason="worse than π_ref")


def test_retention_keeps_everything_in_use(reg):
    s = reg.settings.model_copy(update={"retention_keep_retired": 1,
                                        "retention_keep_rejected": 1,
                                        "retention_keep_snapshots": 0})
    r1, r2, r3, prod = (reg.candidate() for _ in range(4))
    for c in (r1, r2, r3, prod):
        _promote(reg, c["id"])
    canary, cand = reg.candidate(), reg.candidate()
    _promote(reg, canary["id"], "canary", 10.0)
    x1, x2, x3 = _reject(reg), _reject(reg), _reject(reg)
    # snapshots: one unused and old, one π_ref of a running job, one π_ref of a job whose
    # checkpoint awaits the gate, and the line's latest (the next job's π_ref)
    s_old, p_old = _snapshot(reg, "old", age_s=7200)
    s_run, p_run = _snapshot(reg, "run")
    s_gate, p_gate = _snapshot(reg, "gate")
    s_new, p_new = _snapshot(reg, "latest")
    reg.job(status="running", snapshot_id=s_run, final_dir=None)
    pending = registry.ensure_pending(reg.engine, reg.settings, reg.job(snapshot_id=s_gate))
    # the snapshots the promotions asked for were taken meanwhile (not part of this test)
    with reg.engine.begin() as conn:
        conn.execute(update(reference_snapshots).where(
            reference_snapshots.c.line == reg.line, reference_snapshots.c.status == "pending"
        ).values(status="failed"))
    # resume states of a finished job
    states = Path(reg.get(x1["id"])["artifact_path"]).parent / "checkpoints" / "step-00000001"
    states.mkdir(parents=True)
    (states / "trainer_state.pt").write_bytes(os.urandom(1000))

    with reg.engine.connect() as conn:
        before = retention.disk_usage(conn, s)
        items = retention.plan(conn, s)
    mine = {(i.kind, i.id) for i in items if i.line == reg.line}
    assert mine == {("checkpoint", r1["id"]), ("checkpoint", r2["id"]),
                    ("checkpoint", x1["id"]), ("checkpoint", x2["id"]),
                    ("snapshot", s_old), ("resume_states", x1["job_id"])}, mine

    # the API shows usage and the plan; a dry run removes nothing
    r = reg.client.get("/v1/storage", headers=reg.h("read"))
    assert r.status_code == 200, r.text
    assert r.json()["total_bytes"] > 0 and r.json()["reclaimable_bytes"] > 0
    assert r.json()["checkpoints_by_stage"]["retired"] > 0
    r = reg.client.post("/v1/storage/cleanup", json={"dry_run": True}, headers=reg.h())
    assert r.status_code == 200 and r.json()["dry_run"] is True
    assert Path(r1["artifact_path"]).exists()

    report = retention.apply(reg.engine, s)
    done = {(i.kind, i.id) for i in report.removed if i.line == reg.line}
    assert done == mine and report.freed_bytes > 0
    for c in (r1, r2, x1, x2):
        assert not Path(c["artifact_path"]).exists()
        assert reg.get(c["id"])["files_deleted_at"] is not None
        ev = reg.events(c["id"])[-1]
        assert ev["action"] == "files_deleted" and ev["actor"] == "retention"
    assert not p_old.exists() and not states.exists()
    for c in (r3, prod, canary, cand, x3, pending):
        assert Path(reg.get(c["id"])["artifact_path"]).exists(), c["stage"]
    for p in (p_run, p_gate, p_new):
        assert p.exists()
    with reg.engine.connect() as conn:
        after = retention.disk_usage(conn, s)
    assert after["total_bytes"] < before["total_bytes"]
    # a checkpoint whose files are gone cannot serve again
    r = reg.client.post(f"/v1/checkpoints/{r2['id']}/promote", json={"stage": "production"},
                        headers=reg.h())
    assert r.status_code == 409 and r.json()["error"] == "files_deleted"
    # rollback skips it too: production r3... goes back past removed checkpoints
    assert registry.rollback(reg.engine, reg.settings, reg.line,
                             registry.Actor.key(1)).checkpoint["id"] == r3["id"]
    # the rolled-back production is now the newest rejected one: x3 falls beyond the count
    again = retention.apply(reg.engine, s)
    assert [(i.kind, i.id) for i in again.removed if i.line == reg.line] == [
        ("checkpoint", x3["id"])]


def test_age_limit_and_minimum_age(reg):
    a, b = reg.candidate(), reg.candidate()
    _promote(reg, a["id"])
    _promote(reg, b["id"])  # a retired just now
    with reg.engine.begin() as conn:
        conn.execute(update(reference_snapshots).where(
            reference_snapshots.c.line == reg.line).values(status="failed"))
    keep_all = reg.settings.model_copy(update={"retention_keep_retired": 5,
                                               "retention_max_age_days": 1.0})
    with reg.engine.connect() as conn:
        assert not [i for i in retention.plan(conn, keep_all) if i.line == reg.line]
    # two days later the age limit applies, even within the count...
    later = datetime.now(UTC) + timedelta(days=2)
    with reg.engine.connect() as conn:
        items = [i for i in retention.plan(conn, keep_all, now=later) if i.line == reg.line]
    assert [(i.kind, i.id) for i in items] == [("checkpoint", a["id"])]
    assert "older than 1 days" in items[0].reason
    # ...but nothing goes sooner than min_age after it left use
    young = keep_all.model_copy(update={"retention_keep_retired": 0,
                                        "retention_min_age_s": 3600.0})
    with reg.engine.connect() as conn:
        assert not [i for i in retention.plan(conn, young) if i.line == reg.line]


def test_a_promotion_racing_retention_wins_or_loses_cleanly(reg):
    """Retention claims the row first: once files_deleted_at is set, promotion refuses."""
    a, b = reg.candidate(), reg.candidate()
    _promote(reg, a["id"])
    _promote(reg, b["id"])
    with reg.engine.begin() as conn:
        conn.execute(update(checkpoints).where(checkpoints.c.id == a["id"])
                     .values(files_deleted_at=datetime.now(UTC)))
    r = reg.client.post(f"/v1/checkpoints/{a['id']}/promote", json={"stage": "canary",
                                                                    "percent": 5},
                        headers=reg.h())
    assert r.status_code == 409 and r.json()["errors"][0]["field"] == "checkpoint_id"


def test_concurrent_cleanups_remove_resume_states_once(reg, monkeypatch):
    """Two cleanups at once (the beat task and POST /v1/storage/cleanup) both plan the same
    resume states: one removes them, the other skips them. Both used to delete the folder
    at the same time and one failed with FileNotFoundError (a 500 or a failed task)."""
    import threading

    job = reg.job(status="failed", final_dir=None)
    states = Path(reg.settings.artifacts_root) / "jobs" / reg.line / str(job) / "checkpoints"
    for k in range(10):
        step = states / f"step-{k:08d}"
        step.mkdir(parents=True)
        for i in range(200):
            (step / f"shard-{i}").write_bytes(b"x")
    real_plan = retention.plan
    both_planned = threading.Barrier(2, timeout=30)

    def plan(*args, **kw):
        items = real_plan(*args, **kw)
        both_planned.wait()
        return items

    monkeypatch.setattr(retention, "plan", plan)
    reports, errors = [], []

    def cleanup() -> None:
        try:
            reports.append(retention.apply(reg.engine, reg.settings))
        except Exception as exc:  # noqa: BLE001 - the assertion reports it
            errors.append(repr(exc))

    threads = [threading.Thread(target=cleanup) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    removed = [i for r in reports for i in r.removed if (i.kind, i.id) == ("resume_states", job)]
    assert len(removed) == 1
    assert not states.exists()


def test_a_cleanup_asked_over_http_names_the_key_in_the_audit_trail(reg):
    """POST /v1/storage/cleanup by an admin key: the files_deleted events name that key, as
    promotions and rollbacks do (the beat task's runs stay "retention"). They said
    "retention" with no key, so who deleted a checkpoint's files by hand was lost."""
    cands = [reg.candidate() for _ in range(4)]
    for c in cands:
        _promote(reg, c["id"])  # the first three retire; the oldest is beyond the newest 2
    with reg.engine.begin() as conn:  # the snapshots the promotions asked for: not copying
        conn.execute(update(reference_snapshots).where(
            reference_snapshots.c.line == reg.line).values(status="failed"))
    r = reg.client.post("/v1/storage/cleanup", json={"dry_run": False}, headers=reg.h())
    assert r.status_code == 200, r.text
    assert ("checkpoint", cands[0]["id"]) in {(i["kind"], i["id"]) for i in r.json()["removed"]}
    [ev] = [e for e in reg.events(cands[0]["id"]) if e["action"] == "files_deleted"]
    assert ev["actor"].startswith("key:") and ev["key_id"] is not None
    assert ev["actor"] == f"key:{ev['key_id']}"


def test_retention_ages_no_date_can_hold_are_refused_at_start(reg):
    """PROSPECT_RETENTION_MAX_AGE_DAYS=inf (or 1e12) and an unbounded MIN_AGE_S were
    accepted, and then GET /v1/storage, the cleanup and the beat task all failed with
    OverflowError. A thousand years still works."""
    import pytest
    from pydantic import ValidationError

    from service.settings import Settings

    for name, value in (("retention_max_age_days", "inf"), ("retention_max_age_days", "1e12"),
                        ("retention_min_age_s", "1e20")):
        with pytest.raises(ValidationError, match=name):
            Settings(**{name: value})
    far = reg.settings.model_copy(update={"retention_max_age_days": 365_000.0,
                                          "retention_min_age_s": 365_000 * 86400.0})
    with reg.engine.connect() as conn:
        retention.plan(conn, far)


def test_a_snapshot_is_kept_min_age_after_it_stopped_being_the_latest(reg):
    """The line's latest snapshot is the next job's π_ref (a supervisor may have just picked
    it). When a newer one lands, the old one left use *then*: it was removed at once when it
    had been taken more than min_age ago, as if it had been unused all along."""
    s = reg.settings.model_copy(update={"retention_keep_snapshots": 0,
                                        "retention_min_age_s": 3600.0})
    old, old_path = _snapshot(reg, "was-latest", age_s=7200)

    def planned(now=None):
        with reg.engine.connect() as conn:
            return {(i.kind, i.id) for i in retention.plan(conn, s, now=now) if i.line == reg.line}

    assert planned() == set()
    _snapshot(reg, "now-latest")
    assert planned() == set()  # superseded a moment ago
    later = datetime.now(UTC) + timedelta(hours=2)
    assert planned(later) == {("snapshot", old)}
    assert old_path.exists()


def test_a_snapshot_is_kept_min_age_after_its_last_checkpoint_left_use(reg):
    """The π_ref of a job whose checkpoint awaited the gate left use when the gate rejected
    it, not when the snapshot was taken."""
    s = reg.settings.model_copy(update={"retention_keep_snapshots": 0,
                                        "retention_min_age_s": 3600.0})
    used, _ = _snapshot(reg, "used", age_s=7200)
    _snapshot(reg, "latest", age_s=7200)
    row = registry.ensure_pending(reg.engine, reg.settings, reg.job(snapshot_id=used))

    def planned(now=None):
        with reg.engine.connect() as conn:
            return {(i.kind, i.id) for i in retention.plan(conn, s, now=now) if i.line == reg.line}

    assert planned() == set()
    registry.record_gate(reg.engine, reg.settings, row["id"], None, passed=False, metrics={},
                         reason="worse than π_ref")
    assert planned() == set()
    assert planned(datetime.now(UTC) + timedelta(hours=2)) == {("snapshot", used)}


# ---- a job retried while retention runs: its π_ref and its resume states stay

def _failed_job_with_states(reg, snapshot_id=None) -> tuple[int, Path]:
    job = reg.job(status="failed", final_dir=None, snapshot_id=snapshot_id)
    states = Path(reg.settings.artifacts_root) / "jobs" / reg.line / str(job) / "checkpoints"
    (states / "step-00000010").mkdir(parents=True)
    (states / "step-00000010" / "trainer_state.pt").write_bytes(os.urandom(1000))
    return job, states


def test_resume_states_of_a_job_retried_after_the_plan_are_kept(reg, monkeypatch):
    """Retention planned the resume states of a failed job; the job was retried before they
    were removed. They used to go anyway (the folder was claimed without asking the job's
    row), so the retried run lost its checkpoint, or had it deleted under its feet."""
    from service.job_retry import retry_job

    job, states = _failed_job_with_states(reg)
    real_plan = retention.plan

    def plan_then_retry(*args, **kw):
        items = real_plan(*args, **kw)
        assert ("resume_states", job) in {(i.kind, i.id) for i in items}
        retry_job(reg.engine, reg.settings, job)
        return items

    monkeypatch.setattr(retention, "plan", plan_then_retry)
    report = retention.apply(reg.engine, reg.settings)
    assert ("resume_states", job) not in {(i.kind, i.id) for i in report.removed}
    assert (states / "step-00000010" / "trainer_state.pt").exists()


def _waiting_for_a_lock(engine) -> bool:
    from sqlalchemy import text

    with engine.connect() as conn:
        return bool(conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()")).scalar_one())


def test_retention_waits_for_a_retry_that_holds_the_snapshot_and_keeps_it(pg_reg):
    """A retry between its job UPDATE and its commit holds the π_ref row; retention deciding
    "unneeded" meanwhile waits for it and then sees the job queued. One UPDATE judged by what
    it read before the wait deleted the π_ref of the job now queued."""
    import threading

    from sqlalchemy import select

    from service.models import training_jobs
    from tests.jobs.conftest import wait_for

    reg = pg_reg
    s = reg.settings.model_copy(update={"retention_keep_snapshots": 0})
    old, old_path = _snapshot(reg, "old", age_s=7200)
    _snapshot(reg, "latest")
    job = reg.job(status="failed", final_dir=None, snapshot_id=old)
    with reg.engine.connect() as conn:
        assert ("snapshot", old) in {(i.kind, i.id) for i in retention.plan(conn, s)}
    held = reg.engine.connect()
    tx = held.begin()
    held.execute(update(training_jobs).where(training_jobs.c.id == job).values(status="queued"))
    held.execute(select(reference_snapshots.c.id).where(reference_snapshots.c.id == old)
                 .with_for_update())
    reports = []
    t = threading.Thread(target=lambda: reports.append(retention.apply(reg.engine, s)))
    t.start()
    try:
        wait_for(lambda: _waiting_for_a_lock(reg.engine), 30, "retention to wait for the retry")
    finally:
        tx.commit()
        held.close()
    t.join(60)
    assert ("snapshot", old) not in {(i.kind, i.id) for i in reports[0].removed}
    with reg.engine.connect() as conn:
        assert conn.execute(select(reference_snapshots.c.status).where(
            reference_snapshots.c.id == old)).scalar_one() == "ready"
    assert old_path.is_dir()


def test_a_retry_waits_for_retention_deleting_its_snapshot_and_is_refused(pg_reg):
    """Retention has claimed the π_ref (status deleted, not committed yet) when the retry
    checks it: the retry waits for that decision and answers 409 instead of queuing a job
    whose π_ref files are about to go."""
    import threading

    from sqlalchemy import select

    from service.job_retry import retry_job
    from service.jobs import JobRefused, get_job
    from tests.jobs.conftest import wait_for

    reg = pg_reg
    old, _ = _snapshot(reg, "old", age_s=7200)
    _snapshot(reg, "latest")
    job = reg.job(status="failed", final_dir=None, snapshot_id=old)
    held = reg.engine.connect()
    tx = held.begin()
    held.execute(select(reference_snapshots.c.id).where(reference_snapshots.c.id == old)
                 .with_for_update())
    held.execute(update(reference_snapshots).where(reference_snapshots.c.id == old)
                 .values(status="deleted"))
    outcome = []

    def retry() -> None:
        try:
            outcome.append(retry_job(reg.engine, reg.settings, job))
        except JobRefused as exc:
            outcome.append(exc)

    t = threading.Thread(target=retry)
    t.start()
    try:
        wait_for(lambda: outcome or _waiting_for_a_lock(reg.engine), 30,
                 "the retry to wait for retention")
    finally:
        tx.commit()
        held.close()
    t.join(60)
    [refused] = outcome
    assert isinstance(refused, JobRefused) and refused.error == "reference_unavailable", refused
    with reg.engine.connect() as conn:
        assert get_job(conn, job)["status"] == "failed"


def test_the_final_model_of_a_job_cancelled_at_its_end_is_removed_and_a_success_waiting_is_not(
        reg, monkeypatch):
    """A run cancelled after its last step (service.jobs.finish) keeps final/, which no checkpoint
    row owns, so nothing removed a whole model's weights. A succeeded job not yet registered (its
    gate still to come) keeps its model."""
    from sqlalchemy import update as sa_update

    from service.models import training_jobs

    cancelled = reg.job(status="cancelled", final_dir=None)
    final = reg.fake_model(cancelled)
    waiting = reg.job(status="succeeded")  # final/ made, no checkpoint row yet
    retried = reg.job(status="failed", final_dir=None)
    retried_final = reg.fake_model(retried)
    with reg.engine.connect() as conn:
        planned = {(i.kind, i.id) for i in retention.plan(conn, reg.settings)}
    assert ("unregistered_model", cancelled) in planned and ("unregistered_model", retried) in planned
    assert not any(i == waiting for _, i in planned)
    real_plan = retention.plan

    def plan_then_requeue(*args, **kw):  # queued again after the plan: its model stays
        items = real_plan(*args, **kw)
        with reg.engine.begin() as conn:
            conn.execute(sa_update(training_jobs).where(training_jobs.c.id == retried)
                         .values(status="queued", finished_at=None))
        return items

    monkeypatch.setattr(retention, "plan", plan_then_requeue)
    report = retention.apply(reg.engine, reg.settings)
    removed = {(i.kind, i.id) for i in report.removed}
    assert ("unregistered_model", cancelled) in removed and not final.exists()
    assert ("unregistered_model", retried) not in removed and retried_final.exists()
    assert (Path(reg.settings.artifacts_root) / "jobs" / reg.line / str(waiting) / "final").is_dir()
