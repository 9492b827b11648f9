"""The job row's state machine on Postgres: claims, fencing, the reconciler, retry limit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import update

from service import jobs
from service.job_schemas import JobFilters, JobParams
from service.models import training_jobs as tj
from tests.jobs.conftest import seed_feedback


def _create(env, **params):
    return jobs.create_job(env.app.state.engine, env.settings, line="default",
                           params=JobParams(**params), filters=JobFilters())


def _age_heartbeat(env, job_id, seconds=3600):
    with env.app.state.engine.begin() as conn:
        conn.execute(update(tj).where(tj.c.id == job_id).values(
            heartbeat_at=datetime.now(UTC) - timedelta(seconds=seconds)))


def _get(env, job_id):
    with env.app.state.engine.connect() as conn:
        return jobs.get_job(conn, job_id)


def test_claim_is_exclusive(jclient, jenv):
    seed_feedback(jclient, jenv, n=40)
    job = _create(jenv)
    engine = jenv.app.state.engine
    first = jobs.claim(engine, job["id"], "host-a", jenv.settings)
    assert first is not None and first.attempt == 1
    assert jobs.claim(engine, job["id"], "host-b", jenv.settings) is None
    row = _get(jenv, job["id"])
    assert row["status"] == "running" and row["worker_host"] == "host-a"
    assert row["output_dir"].endswith(f"jobs/default/{job['id']}")


def test_requeued_attempt_is_fenced(jclient, jenv):
    seed_feedback(jclient, jenv, n=40)
    job = _create(jenv)
    engine = jenv.app.state.engine
    old = jobs.claim(engine, job["id"], "host-a", jenv.settings)
    assert jobs.record_progress(engine, old, [{"step": 1, "loss": 0.7}], total_steps=10)

    _age_heartbeat(jenv, job["id"])
    report = jobs.reconcile(engine, jenv.settings)
    assert report.requeued == [job["id"]] and job["id"] in report.to_send
    assert _get(jenv, job["id"])["status"] == "queued"

    new = jobs.claim(engine, job["id"], "host-b", jenv.settings)
    assert new is not None and new.attempt == 2
    # Everything the stalled attempt tries now changes nothing.
    assert not jobs.heartbeat(engine, old)
    assert not jobs.record_progress(engine, old, [{"step": 5, "loss": 9.9}])
    assert not jobs.finish(engine, old, "succeeded", result={"x": 1})
    assert jobs.heartbeat(engine, new)
    assert jobs.record_progress(engine, new, [{"step": 2, "loss": 0.6}])
    assert jobs.finish(engine, new, "succeeded", result={"ok": True})
    row = _get(jenv, job["id"])
    assert row["status"] == "succeeded" and row["result"] == {"ok": True} and row["step"] == 2
    with engine.connect() as conn:
        metrics = jobs.job_metrics(conn, job["id"], 0, 100)
    assert [(m["step"], m["attempt"]) for m in metrics] == [(1, 1), (2, 2)]
    # Its own finished row still answers the finishing attempt's heartbeat (child exiting).
    assert jobs.heartbeat(engine, new)


def test_retry_limit_fails_the_job(jclient, jenv):
    seed_feedback(jclient, jenv, n=40)
    job = _create(jenv)
    engine = jenv.app.state.engine
    for attempt in range(1, jenv.settings.job_max_attempts + 1):
        c = jobs.claim(engine, job["id"], f"host-{attempt}", jenv.settings)
        assert c is not None and c.attempt == attempt
        _age_heartbeat(jenv, job["id"])
        report = jobs.reconcile(engine, jenv.settings)
    assert report.failed == [job["id"]] and not report.to_send
    row = _get(jenv, job["id"])
    assert row["status"] == "failed"
    assert "gave up after 3 attempts" in row["error"] and "no heartbeat" in row["error"]
    assert jobs.claim(engine, job["id"], "host-x", jenv.settings) is None


def test_reconciler_leaves_live_jobs_alone_and_resends_unsent(jclient, jenv):
    seed_feedback(jclient, jenv, n=40)
    job = _create(jenv)
    engine = jenv.app.state.engine
    # Never sent (enqueued_at is NULL): the reconciler sends it, once.
    assert jobs.reconcile(engine, jenv.settings).to_send == [job["id"]]
    assert jobs.reconcile(engine, jenv.settings).to_send == []
    c = jobs.claim(engine, job["id"], "host-a", jenv.settings)
    assert c is not None
    report = jobs.reconcile(engine, jenv.settings)
    assert report.to_send == report.requeued == report.failed == []
    assert _get(jenv, job["id"])["status"] == "running"


def test_a_cancel_between_the_reconcilers_read_and_its_write_cancels(jclient, jenv):
    """The reconciler read cancel_requested=False, the API's cancel landed, then the reconciler
    re-queued the job: it sat queued with the flag set, which claim() never takes, and held the
    line forever (a helper's review)."""
    seed_feedback(jclient, jenv, n=40)
    job = _create(jenv)
    engine = jenv.app.state.engine
    assert jobs.claim(engine, job["id"], "host-a", jenv.settings) is not None
    _age_heartbeat(jenv, job["id"])

    class CancelAfterTheRead:
        """The engine, with the API's cancel run just before the reconciler's second transaction."""
        begins = 0

        def __getattr__(self, name):
            return getattr(engine, name)

        def begin(self):
            CancelAfterTheRead.begins += 1
            if CancelAfterTheRead.begins == 2:
                assert jobs.request_cancel(engine, job["id"])["status"] == "running"
            return engine.begin()

    report = jobs.reconcile(CancelAfterTheRead(), jenv.settings)
    assert report.cancelled == [job["id"]] and report.requeued == [] and job["id"] not in report.to_send
    row = _get(jenv, job["id"])
    assert row["status"] == "cancelled" and row["attempt_token"] is None
    with engine.connect() as conn:
        assert jobs.active_job(conn, "default") is None


def test_a_cancel_accepted_before_the_success_is_written_cancels(jclient, jenv):
    """The API answered 202 to a cancel that landed after the trainer's last check: the run then
    wrote "succeeded" and its model went to the gate. The cancel wins; the result is kept."""
    seed_feedback(jclient, jenv, n=40)
    job = _create(jenv)
    engine = jenv.app.state.engine
    c = jobs.claim(engine, job["id"], "host-a", jenv.settings)
    assert jobs.request_cancel(engine, job["id"])["status"] == "running"
    assert jobs.finish(engine, c, "succeeded", result={"final_dir": "/x/final"})
    row = _get(jenv, job["id"])
    assert row["status"] == "cancelled" and row["error"] == jobs.CANCELLED_AT_THE_END
    assert row["result"] == {"final_dir": "/x/final"} and row["finished_at"] is not None
    from service import registry
    assert registry.ensure_pending(engine, jenv.settings, job["id"]) is None
    # without a cancel, and for a failure with one, the status is the attempt's own
    other = _create_after(jenv, job)
    c2 = jobs.claim(engine, other["id"], "host-a", jenv.settings)
    assert jobs.finish(engine, c2, "succeeded", result={"ok": True})
    assert _get(jenv, other["id"])["status"] == "succeeded"


def test_a_cancel_landing_inside_finish_cannot_be_lost(jclient, jenv):
    """finish() read the flag and wrote the success in two statements: a cancel committed
    between them (the first matched no row, so it locked none) was answered 202 and then
    overwritten by "succeeded", and the model went to the gate. Whichever commits first
    decides: a cancel the API accepted always ends the run cancelled."""
    import threading

    from sqlalchemy import event

    from service.errors import ApiError

    seed_feedback(jclient, jenv, n=40)
    job = _create(jenv)
    engine = jenv.app.state.engine
    c = jobs.claim(engine, job["id"], "host-a", jenv.settings)
    answers: list[str] = []
    fired: list[threading.Thread] = []
    finishing = threading.get_ident()

    def cancel() -> None:
        try:
            answers.append(jobs.request_cancel(engine, job["id"])["status"])
        except ApiError as exc:
            answers.append(exc.error)

    def after(conn, cursor, statement, params, context, executemany):
        if (statement.lstrip().upper().startswith("UPDATE TRAINING_JOBS") and not fired
                and threading.get_ident() == finishing):
            fired.append(threading.Thread(target=cancel))
            fired[0].start()
            fired[0].join(2.0)  # done at once unless finish() holds the row; then after its commit

    event.listen(engine, "after_cursor_execute", after)
    try:
        assert jobs.finish(engine, c, "succeeded", result={"final_dir": "/x/final"})
    finally:
        event.remove(engine, "after_cursor_execute", after)
    fired[0].join(30)
    row = _get(jenv, job["id"])
    if answers == ["running"]:  # accepted while the run was live: the cancel must win
        assert row["status"] == "cancelled" and row["error"] == jobs.CANCELLED_AT_THE_END, row
    else:  # the success committed first: the cancel is refused, not lost
        assert answers == ["job_finished"] and row["status"] == "succeeded", (answers, row)


def _create_after(env, job):
    """A second job on the line once the first has finished (one active job per line)."""
    assert _get(env, job["id"])["status"] not in ("queued", "running")
    return _create(env)


def test_a_queued_row_with_a_cancel_flag_is_cancelled_when_claimed(jclient, jenv):
    """Rows an older reconciler left queued with cancel_requested set heal on the next claim."""
    seed_feedback(jclient, jenv, n=40)
    job = _create(jenv)
    with jenv.app.state.engine.begin() as conn:
        conn.execute(update(tj).where(tj.c.id == job["id"]).values(cancel_requested=True))
    assert jobs.claim(jenv.app.state.engine, job["id"], "host-a", jenv.settings) is None
    row = _get(jenv, job["id"])
    assert row["status"] == "cancelled" and row["finished_at"] is not None


def test_cancel_flag_on_a_lost_worker_cancels(jclient, jenv):
    seed_feedback(jclient, jenv, n=40)
    job = _create(jenv)
    engine = jenv.app.state.engine
    jobs.claim(engine, job["id"], "host-a", jenv.settings)
    assert jobs.request_cancel(engine, job["id"])["cancel_requested"] is True
    _age_heartbeat(jenv, job["id"])
    assert jobs.reconcile(engine, jenv.settings).cancelled == [job["id"]]
    assert _get(jenv, job["id"])["status"] == "cancelled"


def test_a_constraint_other_than_the_busy_line_is_a_retryable_conflict(jclient, jenv, monkeypatch):
    """create_job read every IntegrityError as "line busy", naming no job when none was active
    (say the π_ref snapshot it picked was deleted meanwhile). Simulated: the unique index trips
    while no active job can be found."""
    import pytest

    seed_feedback(jclient, jenv, n=40)
    first = _create(jenv)
    monkeypatch.setattr(jobs, "active_job", lambda conn, line: None)  # as if no job held the line
    with pytest.raises(jobs.JobRefused) as err:
        _create(jenv)
    assert err.value.error == "conflict" and err.value.status == 409, err.value.message
    monkeypatch.undo()
    with pytest.raises(jobs.JobRefused) as err:
        _create(jenv)
    assert err.value.error == "line_busy" and err.value.extra["active_job_id"] == first["id"]


def test_non_finite_metrics_are_stored_as_null_not_a_database_error(jclient, jenv):
    """A diverging run logs loss NaN or grad_norm inf. JSON has no NaN/Infinity: Postgres
    refused the whole batch (invalid input syntax for type json), so the attempt failed with a
    database error in place of its metrics, and SQLite stored what Postgres refused."""
    import math

    seed_feedback(jclient, jenv, n=40)
    job = _create(jenv)
    engine = jenv.app.state.engine
    c = jobs.claim(engine, job["id"], "host-a", jenv.settings)
    rows = [{"step": 1, "loss": 0.7, "grad_norm": 1.0},
            {"step": 2, "loss": math.nan, "grad_norm": math.inf, "kl": -math.inf}]
    assert jobs.record_progress(engine, c, rows, total_steps=10)
    assert jobs.finish(engine, c, "succeeded", result={"final_metrics": rows[1]})
    with engine.connect() as conn:
        metrics = jobs.job_metrics(conn, job["id"], 0, 100)
    assert [m["metrics"] for m in metrics] == [
        rows[0], {"step": 2, "loss": None, "grad_norm": None, "kl": None}]
    row = _get(jenv, job["id"])
    assert row["status"] == "succeeded" and row["step"] == 2
    assert row["result"] == {"final_metrics": {"step": 2, "loss": None, "grad_norm": None,
                                               "kl": None}}
