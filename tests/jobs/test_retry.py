"""POST /v1/jobs/{id}/retry without a worker (Postgres, Redis): a failed or cancelled job goes
back to queued with fresh attempts and its task is sent; everything else is a 409 naming the
field; concurrent retries let exactly one win; the retraining backoff and the failure webhook
stay right for a job that runs again."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import redis
from sqlalchemy import insert, select, update

from service import jobs, notify
from service.auth import KeyStore, digest
from service.job_schemas import JobFilters, JobParams
from service.lines import put_line
from service.models import reference_snapshots as rs
from service.models import training_jobs as tj
from tests.jobs.conftest import REDIS_URL, seed_feedback


def _create(env, line="default", **params):
    return jobs.create_job(env.app.state.engine, env.settings, line=line,
                           params=JobParams(**params), filters=JobFilters())


def _fail(env, job_id, error="boom", snapshot_id=None):
    """One attempt that claims the job and fails it, as a worker's would."""
    engine = env.app.state.engine
    c = jobs.claim(engine, job_id, "host-a", env.settings)
    assert c is not None
    if snapshot_id is not None:
        assert jobs.set_reference(engine, c, snapshot_id)
    assert jobs.record_progress(engine, c, [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}],
                                total_steps=10)
    assert jobs.finish(engine, c, "failed", error=error)
    return c


def _get(env, job_id):
    with env.app.state.engine.connect() as conn:
        return jobs.get_job(conn, job_id)


def _retry(client, env, job_id, scope="admin"):
    return client.post(f"/v1/jobs/{job_id}/retry", headers=env.headers(scope))


def _key_id(env, scope):
    return KeyStore(env.app.state.engine, 0).load(digest(env.keys[scope])).id


def _train_messages(env) -> list[list[int]]:
    """The args of the train tasks waiting in the session's Redis gpu queue."""
    r = redis.Redis.from_url(REDIS_URL)
    out = []
    for raw in r.lrange(f"{env.settings.broker_key_prefix}gpu", 0, -1):
        headers = json.loads(raw)["headers"]
        if headers["task"] == "prospect.train":
            out.append(json.loads(headers["argsrepr"]))
    return out


def _drain(env) -> None:
    redis.Redis.from_url(REDIS_URL).delete(f"{env.settings.broker_key_prefix}gpu")


def test_a_failed_job_is_queued_again_with_fresh_attempts_and_sent(jclient, jenv):
    seed_feedback(jclient, jenv, n=60)
    _drain(jenv)
    created = jclient.post("/v1/jobs", json={"params": {"max_steps": 10}},
                           headers=jenv.headers("admin")).json()
    _fail(jenv, created["id"], error="Traceback ...\nRuntimeError: CUDA error: out of memory")
    _drain(jenv)
    before = _get(jenv, created["id"])

    r = _retry(jclient, jenv, created["id"])
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["enqueued"] is True
    assert job["attempt"] == 1 and job["max_attempts"] == 1 + jenv.settings.job_max_attempts
    for reset in ("error", "finished_at", "heartbeat_at", "worker_host", "result"):
        assert job[reset] is None, reset
    assert job["cancel_requested"] is False and job["retries"] == 1
    # what makes it this job is kept
    for kept in ("requested_by", "params", "filters", "min_event_id", "max_event_id",
                 "lambda_d", "lambda_u", "reference_snapshot_id", "output_dir", "started_at",
                 "step"):
        assert job[kept] == jclient.get(f"/v1/jobs/{created['id']}",
                                        headers=jenv.headers("read")).json()[kept], kept
    assert job["requested_by"] == created["requested_by"] == _key_id(jenv, "admin")
    [entry] = job["retry_history"]
    assert entry["status"] == "failed" and entry["retry"] == 1 and entry["attempt"] == 1
    assert "out of memory" in entry["error"] and entry["step"] == 2
    assert entry["finished_at"] == before["finished_at"].isoformat()
    assert entry["retried_by"] == _key_id(jenv, "admin")
    # the task is in the broker, and the row says it was sent
    assert _train_messages(jenv) == [[created["id"]]]
    assert _get(jenv, created["id"])["enqueued_at"] is not None

    # a worker claims it as attempt 2; the old attempt's token is fenced
    engine = jenv.app.state.engine
    c = jobs.claim(engine, created["id"], "host-b", jenv.settings)
    assert c is not None and c.attempt == 2
    assert jobs.finish(engine, c, "failed", error="again")
    r = _retry(jclient, jenv, created["id"])
    assert r.status_code == 202 and r.json()["max_attempts"] == 2 + jenv.settings.job_max_attempts
    assert [h["error"] for h in r.json()["retry_history"]] == [entry["error"], "again"]


def test_a_cancelled_job_is_retried(jclient, jenv):
    seed_feedback(jclient, jenv, n=60)
    job = _create(jenv)
    assert jobs.request_cancel(jenv.app.state.engine, job["id"])["status"] == "cancelled"
    r = _retry(jclient, jenv, job["id"])
    assert r.status_code == 202, r.text
    assert r.json()["cancel_requested"] is False and r.json()["attempt"] == 0
    assert r.json()["retry_history"][0]["error"] == "cancelled before it started"
    c = jobs.claim(jenv.app.state.engine, job["id"], "host-a", jenv.settings)
    assert c is not None and c.attempt == 1


def test_only_failed_or_cancelled_jobs_are_retried(jclient, jenv):
    seed_feedback(jclient, jenv, n=60)
    engine = jenv.app.state.engine
    job = _create(jenv)
    r = _retry(jclient, jenv, job["id"])  # queued
    assert r.status_code == 409 and r.json()["error"] == "job_not_retryable"
    assert r.json()["errors"][0]["field"] == "job_id" and "queued" in r.json()["message"]
    c = jobs.claim(engine, job["id"], "host-a", jenv.settings)
    r = _retry(jclient, jenv, job["id"])  # running
    assert r.status_code == 409 and "running" in r.json()["message"]
    assert jobs.finish(engine, c, "succeeded", result={})
    r = _retry(jclient, jenv, job["id"])
    assert r.status_code == 409 and "succeeded" in r.json()["message"]
    assert _get(jenv, job["id"])["status"] == "succeeded"


def test_a_job_with_a_registered_checkpoint_is_not_retried(jclient, jenv):
    from service import registry

    seed_feedback(jclient, jenv, n=60)
    engine = jenv.app.state.engine
    job = _create(jenv)
    c = jobs.claim(engine, job["id"], "host-a", jenv.settings)
    assert jobs.finish(engine, c, "succeeded", result={"final_dir": None})
    assert registry.ensure_pending(engine, jenv.settings, job["id"]) is not None
    with engine.begin() as conn:  # whatever said failed afterwards: the model exists
        conn.execute(update(tj).where(tj.c.id == job["id"]).values(status="failed"))
    r = _retry(jclient, jenv, job["id"])
    assert r.status_code == 409 and r.json()["error"] == "job_has_checkpoint"
    assert r.json()["errors"][0]["field"] == "job_id"


def test_a_busy_line_refuses_the_retry(jclient, jenv):
    seed_feedback(jclient, jenv, n=60)
    old = _create(jenv)
    _fail(jenv, old["id"])
    other = _create(jenv)
    r = _retry(jclient, jenv, old["id"])
    assert r.status_code == 409 and r.json()["error"] == "line_busy"
    assert r.json()["errors"][0]["field"] == "line" and str(other["id"]) in r.json()["message"]
    assert _get(jenv, old["id"])["status"] == "failed"


def test_a_job_that_became_active_meanwhile_is_a_busy_line_not_a_500(jclient, jenv, monkeypatch):
    """The check before the write reads no active job; one is queued before the write: the
    partial unique index refuses it, answered as the busy line."""
    from service import job_retry

    seed_feedback(jclient, jenv, n=60)
    old = _create(jenv)
    _fail(jenv, old["id"])
    made = []
    real = job_retry.active_job

    def racing(conn, line):
        found = real(conn, line)
        if not made:
            made.append(_create(jenv))  # another process, committed
        return found

    monkeypatch.setattr(job_retry, "active_job", racing)
    r = _retry(jclient, jenv, old["id"])
    assert r.status_code == 409 and r.json()["error"] == "line_busy", r.text
    assert f"({made[0]['id']})" in r.json()["message"]
    assert _get(jenv, old["id"])["status"] == "failed"


def test_unknown_job_and_scopes(jclient, jenv):
    seed_feedback(jclient, jenv, n=60)
    job = _create(jenv)
    _fail(jenv, job["id"])
    r = _retry(jclient, jenv, 999999)
    assert r.status_code == 404 and r.json()["errors"][0]["field"] == "job_id"
    assert _retry(jclient, jenv, 0).status_code == 422
    assert _retry(jclient, jenv, job["id"], "read").status_code == 403
    assert _retry(jclient, jenv, job["id"], "ingest").status_code == 403
    assert jclient.post(f"/v1/jobs/{job['id']}/retry").status_code == 401
    assert _get(jenv, job["id"])["status"] == "failed"


def test_concurrent_retries_of_one_job_let_exactly_one_win(jclient, jenv):
    seed_feedback(jclient, jenv, n=60)
    job = _create(jenv)
    _fail(jenv, job["id"])
    _drain(jenv)
    barrier = threading.Barrier(8)

    def retry(_):
        barrier.wait()
        return _retry(jclient, jenv, job["id"])

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(retry, range(8)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [202] + [409] * 7, [a.text for a in answers]
    assert {a.json()["error"] for a in answers if a.status_code == 409} <= {
        "job_not_retryable", "line_busy"}
    row = _get(jenv, job["id"])
    assert row["status"] == "queued" and row["retries"] == 1 and len(row["retry_history"]) == 1
    assert _train_messages(jenv) == [[job["id"]]]


def _line_with_snapshot(jenv, toy_model_dir, name, status, source=None):
    with jenv.app.state.engine.begin() as conn:
        put_line(conn, name, str(toy_model_dir), feedback="all")  # the seeded versions are no line's
        return conn.execute(insert(rs).values(
            line=name, status=status, source=source or str(toy_model_dir),
            content_hash="0" * 64, path="/nonexistent", created_at=datetime.now(UTC),
            finished_at=datetime.now(UTC)).returning(rs.c.id)).scalar_one()


def test_a_job_whose_reference_is_gone_or_stale_is_not_retried(jclient, jenv, toy_model_dir):
    import secrets

    seed_feedback(jclient, jenv, n=60)
    tag = secrets.token_hex(3)
    for status, source, error in (("deleted", None, "reference_unavailable"),
                                  ("failed", None, "reference_unavailable"),
                                  ("ready", "/models/an-older-production", "reference_stale")):
        line = f"retry-{status}-{tag}"
        snap = _line_with_snapshot(jenv, toy_model_dir, line, status, source)
        job = _create(jenv, line=line)
        _fail(jenv, job["id"], snapshot_id=snap)
        r = _retry(jclient, jenv, job["id"])
        assert r.status_code == 409 and r.json()["error"] == error, r.text
        assert r.json()["errors"][0]["field"] == "reference_snapshot_id"
        row = _get(jenv, job["id"])
        assert row["status"] == "failed" and row["retries"] == 0 and row["error"] == "boom"
    # the same π_ref, still ready and still what the line serves: retried
    line = f"retry-ok-{tag}"
    snap = _line_with_snapshot(jenv, toy_model_dir, line, "ready")
    job = _create(jenv, line=line)
    _fail(jenv, job["id"], snapshot_id=snap)
    assert _retry(jclient, jenv, job["id"]).status_code == 202


def test_the_retraining_check_waits_for_a_retried_job_and_a_success_ends_the_streak(jclient,
                                                                                 jenv):
    engine = jenv.app.state.engine
    settings = jenv.settings.model_copy(update={"retrain_failure_backoff_s": 600.0})
    seed_feedback(jclient, jenv, n=60)
    first = jobs.check_retraining(engine, settings, "default").job_id
    _fail(jenv, first)
    assert _retry(jclient, jenv, first).status_code == 202
    d = jobs.check_retraining(engine, settings, "default")
    assert d.job_id is None and d.reason == f"job {first} is active"
    c = jobs.claim(engine, first, "h", settings)
    assert jobs.finish(engine, c, "failed", error="again")
    d = jobs.check_retraining(engine, settings, "default")
    assert d.job_id is None and "1 consecutive failed job" in d.reason
    # an older job retried to success after a newer one failed: the line's latest outcome
    # is a success, so the check does not back off
    with engine.begin() as conn:
        conn.execute(update(tj).where(tj.c.id == first).values(
            finished_at=datetime(2020, 1, 1, tzinfo=UTC)))  # long over: a newer job may run
    second = jobs.check_retraining(engine, settings, "default").job_id
    assert second is not None and second != first
    _fail(jenv, second)
    assert "2 consecutive failed job" in jobs.check_retraining(engine, settings, "default").reason
    assert _retry(jclient, jenv, first).status_code == 202
    c = jobs.claim(engine, first, "h", settings)
    assert jobs.finish(engine, c, "succeeded", result={})
    seed_feedback(jclient, jenv, n=60, seed=1)
    d = jobs.check_retraining(engine, settings, "default")
    assert d.job_id is not None, d.reason


def test_a_retried_job_that_fails_again_is_announced_again(jclient, jenv):
    from service.models import notifications as nt

    engine = jenv.app.state.engine
    settings = jenv.settings.model_copy(update={"webhook_url": "http://127.0.0.1:9/hook"})
    seed_feedback(jclient, jenv, n=60)
    job = _create(jenv)
    _fail(jenv, job["id"])
    assert notify.enqueue_job_failures(engine, settings) == 1
    assert notify.enqueue_job_failures(engine, settings) == 0  # once per fact
    assert _retry(jclient, jenv, job["id"]).status_code == 202
    c = jobs.claim(engine, job["id"], "h", settings)
    assert jobs.finish(engine, c, "failed", error="again")
    assert notify.enqueue_job_failures(engine, settings) == 1
    with engine.connect() as conn:
        payloads = [r.payload for r in conn.execute(select(nt.c.payload).order_by(nt.c.id))]
    assert [(p["job_id"], p["retries"], p["reason"]) for p in payloads] == [
        (job["id"], 0, "boom"), (job["id"], 1, "again")]
