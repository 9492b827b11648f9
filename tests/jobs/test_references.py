"""π_ref snapshots: immutable hashed folders, no copy when production did not change, taken by
a real worker on request, and never deleted while a job refers to them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from service import jobs
from service.job_schemas import JobFilters, JobParams, SnapshotOut
from service.lines import put_line
from tests.jobs.conftest import seed_feedback, wait_for
from worker.references import current_reference
from worker.snapshot import tree_hash, verify_snapshot


def _env_with_model(jenv, model_dir):
    return jenv.settings.model_copy(update={"base_model": str(model_dir)})


def test_snapshot_is_immutable_and_deduplicated(jenv, toy_model_dir, tmp_path):
    engine = jenv.app.state.engine
    model = tmp_path / "prod"
    shutil.copytree(toy_model_dir, model)
    settings = _env_with_model(jenv, model)

    snap = current_reference(engine, settings, "default")
    path = Path(snap["path"])
    assert snap["status"] == "ready" and verify_snapshot(path)
    assert snap["content_hash"] == tree_hash(model).content_hash
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "prospect.reference/v1" and manifest["files"]
    assert all(not os.access(p, os.W_OK) or os.geteuid() == 0 for p in path.iterdir())
    assert all((p.stat().st_mode & 0o222) == 0 for p in path.iterdir() if p.is_file())

    # Unchanged production: the same snapshot, nothing written.
    again = current_reference(engine, settings, "default")
    assert again["id"] == snap["id"]

    # Production changed: a new snapshot with another hash; the old one is untouched.
    cfg = json.loads((model / "config.json").read_text())
    cfg["rope_theta"] = cfg.get("rope_theta", 10000.0) * 2
    (model / "config.json").write_text(json.dumps(cfg))
    changed = current_reference(engine, settings, "default")
    assert changed["id"] != snap["id"] and changed["content_hash"] != snap["content_hash"]
    assert verify_snapshot(path) and verify_snapshot(changed["path"])

    # Tampering is detected.
    target = Path(changed["path"]) / "config.json"
    target.chmod(0o644)
    target.write_text("{}")
    assert not verify_snapshot(changed["path"])


def test_requested_snapshot_via_worker_and_guarded_delete(jclient, jenv, start_worker):
    start_worker("default")
    r = jclient.post("/v1/references", json={}, headers=jenv.headers("admin"))
    assert r.status_code == 202 and r.json()["status"] == "pending", r.text
    sid = r.json()["id"]
    public = set(SnapshotOut.model_fields)
    # The worker's claim token and heartbeat are not part of the answer.
    assert set(r.json()) == public | {"enqueued"}, r.json()

    def done():
        s = jclient.get(f"/v1/references/{sid}", headers=jenv.headers("read")).json()
        return s if s["status"] != "pending" else None

    snap = wait_for(done, 60, "the worker to take the snapshot")
    assert snap["status"] in ("ready", "unchanged"), snap
    assert set(snap) == public, snap
    ready_id = snap["id"] if snap["status"] == "ready" else snap["same_as_id"]

    # A job that names the snapshot protects it.
    seed_feedback(jclient, jenv, n=30)
    job = jobs.create_job(jenv.app.state.engine, jenv.settings, line="default",
                          params=JobParams(), filters=JobFilters())
    assert job["reference_snapshot_id"] is not None
    protected = job["reference_snapshot_id"]
    r = jclient.delete(f"/v1/references/{protected}", headers=jenv.headers("admin"))
    assert r.status_code == 409 and r.json()["error"] == "snapshot_in_use"
    assert verify_snapshot(jclient.get(f"/v1/references/{protected}",
                                       headers=jenv.headers("read")).json()["path"])
    assert jclient.delete(f"/v1/references/{ready_id}",
                          headers=jenv.headers("read")).status_code == 403

    # An unused one can go, files included.
    from sqlalchemy import delete

    from service.models import training_jobs

    with jenv.app.state.engine.begin() as conn:
        conn.execute(delete(training_jobs))
    lst = jclient.get("/v1/references", headers=jenv.headers("read")).json()["references"]
    assert lst and all(set(s) == public for s in lst), lst
    victim = next(s for s in lst if s["status"] == "ready"
                  and not any(o["same_as_id"] == s["id"] for o in lst))
    r = jclient.delete(f"/v1/references/{victim['id']}", headers=jenv.headers("admin"))
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert set(r.json()) == public | {"deleted"}
    assert not Path(victim["path"]).exists()
    assert jclient.get(f"/v1/references/{victim['id']}",
                       headers=jenv.headers("read")).status_code == 404



def test_the_default_lines_base_model_is_not_changed_behind_the_setting(jclient, jenv):
    """PROSPECT_BASE_MODEL owns the default line: a PUT of another base model answered 200 with
    it, and the next read put the setting back (jobs, snapshots and serving never used it)."""
    admin = jenv.headers("admin")
    r = jclient.put("/v1/lines/default", json={"base_model": "/models/elsewhere"}, headers=admin)
    assert r.status_code == 409 and r.json()["errors"][0]["field"] == "base_model", r.text
    lines = jclient.get("/v1/lines", headers=jenv.headers("read")).json()["lines"]
    assert {x["name"]: x["base_model"] for x in lines}["default"] == jenv.settings.base_model
    # Sending the configured one is a no-op that answers the line.
    r = jclient.put("/v1/lines/default", json={"base_model": jenv.settings.base_model},
                    headers=admin)
    assert r.status_code == 200 and r.json()["base_model"] == jenv.settings.base_model


def test_lines_api(jclient, jenv, toy_model_dir):
    r = jclient.put("/v1/lines/support-bot", json={"base_model": str(toy_model_dir)},
                    headers=jenv.headers("admin"))
    assert r.status_code == 200 and r.json()["name"] == "support-bot"
    assert r.json()["feedback"] == "served"  # a new line's default scope
    names = [x["name"] for x in jclient.get("/v1/lines", headers=jenv.headers("read")).json()["lines"]]
    assert {"default", "support-bot"} <= set(names)
    r = jclient.put("/v1/lines/Bad Name", json={"base_model": "x"}, headers=jenv.headers("admin"))
    assert r.status_code == 422
    r = jclient.put("/v1/lines/x", json={}, headers=jenv.headers("admin"))
    assert r.status_code == 422 and "base_model" in r.json()["message"]
    # A job on the new line is independent of the default line's active job. The feedback
    # (model_version "base") is no version support-bot served: its scope must be "all" first.
    seed_feedback(jclient, jenv, n=30)
    a = jclient.post("/v1/jobs", json={}, headers=jenv.headers("admin"))
    b = jclient.post("/v1/jobs", json={"line": "support-bot"}, headers=jenv.headers("admin"))
    assert a.status_code == 202 and b.status_code == 409, b.text
    assert b.json()["error"] == "too_few_users"
    r = jclient.put("/v1/lines/support-bot", json={"feedback": "all"}, headers=jenv.headers("admin"))
    assert r.status_code == 200 and r.json()["base_model"] == str(toy_model_dir)
    b = jclient.post("/v1/jobs", json={"line": "support-bot"}, headers=jenv.headers("admin"))
    assert b.status_code == 202 and b.json()["filters"]["feedback"] == "all", b.text


def test_job_never_uses_a_snapshot_of_an_older_production(jclient, jenv, tmp_path,
                                                          toy_model_dir):
    """While the newest snapshot is of another model than the line serves now, a new job
    names none, and its supervisor snapshots the current production."""
    engine = jenv.app.state.engine
    seed_feedback(jclient, jenv, n=30)
    with engine.begin() as conn:
        put_line(conn, "moving", str(toy_model_dir), feedback="all")  # seeded: version "base"
    settings = jenv.settings
    first = current_reference(engine, settings, "moving")
    job = jobs.create_job(engine, settings, line="moving", params=JobParams(),
                          filters=JobFilters())
    assert job["reference_snapshot_id"] == first["id"]
    jobs.request_cancel(engine, job["id"])
    moved = tmp_path / "new-prod"
    shutil.copytree(toy_model_dir, moved)
    with engine.begin() as conn:
        put_line(conn, "moving", str(moved))
    job = jobs.create_job(engine, settings, line="moving", params=JobParams(),
                          filters=JobFilters())
    assert job["reference_snapshot_id"] is None


def _pending_snapshot(jenv, toy_model_dir, tmp_path):
    """A pending snapshot of a model no other snapshot has (a random extra file)."""
    from service.references import request_snapshot

    model = tmp_path / "prod"
    shutil.copytree(toy_model_dir, model)
    (model / "extra.json").write_text(json.dumps({"salt": os.urandom(8).hex()}))
    with jenv.app.state.engine.begin() as conn:
        return request_snapshot(conn, "default", str(model), None)["id"]


def _row(jenv, snapshot_id):
    from service.references import get_snapshot

    with jenv.app.state.engine.connect() as conn:
        return get_snapshot(conn, snapshot_id)


def _stalled(jenv):
    """Settings under which a delivery's heartbeat is stale at once: two deliveries of one
    snapshot then both go ahead, as when a worker stalls past heartbeat_timeout_s."""
    return jenv.settings.model_copy(update={"heartbeat_timeout_s": 1e-6, "heartbeat_interval_s": 3600.0})


def test_a_second_delivery_that_read_pending_leaves_the_ready_snapshot_alone(jenv, toy_model_dir, tmp_path,
                                                                             monkeypatch):
    """Delivery 2 read `pending`; delivery 1 finished while 2 hashed the source. 2 then found the
    row itself as the latest ready snapshot with the same hash, marked it `unchanged`, pointing at
    itself, and deleted its folder (a helper's review)."""
    import worker.references as wr

    engine, sid = jenv.app.state.engine, _pending_snapshot(jenv, toy_model_dir, tmp_path)
    settings = _stalled(jenv)
    real, first = wr.tree_hash, []

    def hash_while_the_other_delivery_finishes(src):
        if not first:
            first.append(None)  # the nested delivery hashes through here too
            first[0] = wr.take_snapshot(engine, settings, sid)
        return real(src)

    monkeypatch.setattr(wr, "tree_hash", hash_while_the_other_delivery_finishes)
    second = wr.take_snapshot(engine, settings, sid)
    assert first[0]["status"] == "ready"
    row = _row(jenv, sid)
    assert second["status"] == row["status"] == "ready" and row["same_as_id"] is None
    assert verify_snapshot(row["path"])
    assert not list(Path(row["path"]).parent.glob(f".{sid}.staging-*"))


def test_two_deliveries_that_both_copy_keep_one_folder_and_a_ready_row(jenv, toy_model_dir, tmp_path,
                                                                       monkeypatch):
    """Both copied; delivery 1 published first. Delivery 2's rename then failed and its error
    handler marked the ready row failed (a helper's review)."""
    import worker.references as wr

    engine, sid = jenv.app.state.engine, _pending_snapshot(jenv, toy_model_dir, tmp_path)
    settings = _stalled(jenv)
    real, first = wr.freeze, []

    def copy_while_the_other_delivery_finishes(*args):
        out = real(*args)
        if not first:
            first.append(None)  # the nested delivery copies through here too
            first[0] = wr.take_snapshot(engine, settings, sid)
        return out

    monkeypatch.setattr(wr, "freeze", copy_while_the_other_delivery_finishes)
    second = wr.take_snapshot(engine, settings, sid)
    row = _row(jenv, sid)
    assert first[0]["status"] == second["status"] == row["status"] == "ready"
    assert verify_snapshot(row["path"])
    assert not list(Path(row["path"]).parent.glob(f".{sid}.staging-*"))

    # a delivery that fails after the row was decided changes nothing either
    from service.references import fail_snapshot

    with engine.begin() as conn:
        assert not fail_snapshot(conn, sid, "OSError: disk full")
    assert _row(jenv, sid)["status"] == "ready" and verify_snapshot(row["path"])


def test_a_duplicate_delivery_waits_while_another_worker_copies(jenv, toy_model_dir, tmp_path, monkeypatch):
    """The gate sweep re-sent a production snapshot still being copied every sweep, and every
    delivery copied the whole model again. A delivery now holds a heartbeat on the row: a
    duplicate returns at once, and the sweep leaves the row alone while the heartbeat is fresh."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    import worker.references as wr
    from service.models import reference_snapshots as rs

    engine, sid = jenv.app.state.engine, _pending_snapshot(jenv, toy_model_dir, tmp_path)
    copies, nested = [], []
    real = wr.freeze

    def counting_freeze(*args):
        copies.append(args[1])
        if not nested:
            nested.append(wr.take_snapshot(engine, jenv.settings, sid))  # the duplicate, mid-copy
        return real(*args)

    monkeypatch.setattr(wr, "freeze", counting_freeze)
    done = wr.take_snapshot(engine, jenv.settings, sid)
    assert nested[0]["status"] == "pending" and len(copies) == 1  # it did not copy
    assert done["status"] == "ready" and verify_snapshot(done["path"])

    # the sweep's side: a pending production snapshot with a fresh heartbeat is not re-sent
    from service.references import claim_snapshot

    sid2 = _pending_snapshot(jenv, toy_model_dir, tmp_path / "two")
    old = datetime.now(UTC) - timedelta(seconds=jenv.settings.heartbeat_timeout_s + 5)
    from service.references import complete_snapshot, fail_snapshot, get_snapshot

    with engine.begin() as conn:
        stalled = claim_snapshot(conn, sid2, jenv.settings.heartbeat_timeout_s)
        assert stalled is not None
        assert claim_snapshot(conn, sid2, jenv.settings.heartbeat_timeout_s) is None  # held
        conn.execute(update(rs).where(rs.c.id == sid2).values(heartbeat_at=old))
        holder = claim_snapshot(conn, sid2, jenv.settings.heartbeat_timeout_s)  # a stalled holder loses it
        assert holder is not None and holder != stalled
        # the stalled delivery can neither fail nor complete the row the new holder works on
        assert not fail_snapshot(conn, sid2, "OSError: stalled copy", stalled)
        assert complete_snapshot(conn, sid2, "0" * 64, "/nowhere", 1, stalled) is None
        assert get_snapshot(conn, sid2)["status"] == "pending"
        assert fail_snapshot(conn, sid2, "OSError: disk full", holder)


def test_a_copy_needed_after_all_is_made_outside_the_transaction(jenv, toy_model_dir, tmp_path, monkeypatch):
    """The hash matched the latest ready snapshot, so nothing was copied; that snapshot was deleted
    before the row was decided, so the row became `ready` and the whole model was copied inside
    the transaction, holding the database (SQLite) or the row (Postgres) for the copy (a helper's
    review). The decision is now rolled back, the copy made, and the row decided again."""
    from sqlalchemy import delete

    import worker.references as wr
    from service.models import reference_snapshots as rs

    engine = jenv.app.state.engine
    first = wr.take_snapshot(engine, jenv.settings, _pending_snapshot(jenv, toy_model_dir, tmp_path))
    assert first["status"] == "ready"
    from service.references import request_snapshot

    with engine.begin() as conn:
        sid = request_snapshot(conn, "default", first["source"], None)["id"]
    calls = []
    real_complete, real_freeze, real_publish = wr.complete_snapshot, wr.freeze, wr.publish

    def complete(conn, *args):
        if not calls:
            with engine.begin() as other:  # meanwhile, the identical snapshot is deleted
                other.execute(delete(rs).where(rs.c.id == first["id"]))
        calls.append("complete")
        return real_complete(conn, *args)

    def freeze(*args):
        calls.append("freeze")
        return real_freeze(*args)

    def publish(*args):
        calls.append("publish")
        return real_publish(*args)

    monkeypatch.setattr(wr, "complete_snapshot", complete)
    monkeypatch.setattr(wr, "freeze", freeze)
    monkeypatch.setattr(wr, "publish", publish)
    done = wr.take_snapshot(engine, jenv.settings, sid)
    assert calls == ["complete", "freeze", "complete", "publish"]
    assert done["status"] == "ready" and verify_snapshot(done["path"])


def test_a_job_that_takes_the_snapshot_while_it_is_deleted_is_a_409(jclient, jenv, monkeypatch):
    """delete_snapshot_row checks "no job refers to it", then deletes; a job that picked the
    snapshot in between trips the foreign key, and the IntegrityError was a 500. Simulated: the
    check answers as it did before the job was committed."""
    from service import references

    engine = jenv.app.state.engine
    snap = current_reference(engine, jenv.settings, "default")
    seed_feedback(jclient, jenv, n=30)
    job = jobs.create_job(engine, jenv.settings, line="default", params=JobParams(),
                          filters=JobFilters())
    assert job["reference_snapshot_id"] == snap["id"]
    monkeypatch.setattr(references, "snapshot_in_use", lambda conn, snapshot_id: False)
    r = jclient.delete(f"/v1/references/{snap['id']}", headers=jenv.headers("admin"))
    assert r.status_code == 409 and r.json()["error"] == "snapshot_in_use", r.text
    assert r.json()["errors"][0]["field"] == "snapshot_id"
    assert verify_snapshot(snap["path"])
    r = jclient.get(f"/v1/references/{snap['id']}", headers=jenv.headers("read"))
    assert r.status_code == 200 and r.json()["status"] == "ready"


def test_a_job_created_while_retention_deletes_its_snapshot_does_not_take_it(jclient, jenv):
    """create_job read the latest ready π_ref without a lock: retention, deleting that snapshot in
    the same moment, removed the files of a snapshot a queued job then named. The job now share-locks
    the row, waits for retention's transaction, sees the snapshot gone and leaves the worker to take
    a new one. Retention's claim is played by a second connection holding the row."""
    import threading

    from sqlalchemy import select as sa_select
    from sqlalchemy import update as sa_update

    from service.models import reference_snapshots as rs

    engine = jenv.app.state.engine
    snap = current_reference(engine, jenv.settings, "default")
    seed_feedback(jclient, jenv, n=30)
    made: dict = {}
    retention = engine.connect()
    tx = retention.begin()
    try:
        retention.execute(sa_select(rs.c.id).where(rs.c.id == snap["id"]).with_for_update())
        retention.execute(sa_update(rs).where(rs.c.id == snap["id"]).values(status="deleted"))
        t = threading.Thread(target=lambda: made.update(jobs.create_job(
            engine, jenv.settings, line="default", params=JobParams(), filters=JobFilters())))
        t.start()
        t.join(1.5)
        assert t.is_alive(), "the job did not wait for the snapshot row"
        tx.commit()
        t.join(30)
        assert not t.is_alive()
        assert made["reference_snapshot_id"] is None
    finally:
        if tx.is_active:
            tx.rollback()
        retention.close()
        with engine.begin() as conn:
            conn.execute(sa_update(rs).where(rs.c.id == snap["id"]).values(status="ready"))
