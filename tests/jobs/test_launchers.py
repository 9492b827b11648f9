"""The supervisor without Celery: the `accelerate launch` path, and a child that crashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import jobs
from service.job_schemas import JobFilters, JobParams
from service.lines import put_line
from tests.jobs.conftest import seed_feedback
from worker.job_supervisor import child_argv, supervise


def _create(env, **params):
    return jobs.create_job(env.app.state.engine, env.settings, line="default",
                           params=JobParams(**params), filters=JobFilters())


def _claimed(jclient, jenv):
    """A job on 60 events, claimed by this test as a worker would, with its π_ref taken: what
    the training child expects to find."""
    from worker.references import current_reference

    seed_feedback(jclient, jenv, n=60)
    engine = jenv.app.state.engine
    job = _create(jenv, max_steps=3, learning_rate=1e-3)
    claim = jobs.claim(engine, job["id"], "host-a", jenv.settings)
    assert jobs.set_reference(engine, claim,
                              current_reference(engine, jenv.settings, "default")["id"])
    return engine, job, claim


def _job_on_a_line_without_a_model(jclient, jenv, tmp_path, line: str) -> dict:
    """A job whose line's base model folder holds only an empty config.json."""
    seed_feedback(jclient, jenv, n=60)
    base = tmp_path / f"{line}-model"
    base.mkdir()
    (base / "config.json").write_text("{}")
    with jenv.app.state.engine.begin() as conn:
        put_line(conn, line, str(base), feedback="all")  # the seeded versions are not its own
    return jobs.create_job(jenv.app.state.engine, jenv.settings, line=line,
                           params=JobParams(max_steps=3), filters=JobFilters())


def test_accelerate_launcher_runs_the_job(jclient, jenv, monkeypatch):
    seed_feedback(jclient, jenv, n=60)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = jenv.settings.model_copy(update={
        "train_launcher": "accelerate",
        "accelerate_args": "--num_processes 1 --num_machines 1 --cpu --mixed_precision no "
                           "--dynamo_backend no"})
    argv = child_argv(settings, 7, "tok")
    assert argv[1:3] == ["-m", "accelerate.commands.launch"] and "worker.job_child" in argv
    job = _create(jenv, max_steps=3, learning_rate=1e-3)
    assert supervise(job["id"], settings, jenv.app.state.engine) == "succeeded"
    with jenv.app.state.engine.connect() as conn:
        row = jobs.get_job(conn, job["id"])
    assert row["status"] == "succeeded" and row["step"] == 3
    log = (Path(row["output_dir"]) / "logs" / "attempt-1.log").read_text()
    assert "accelerate" in log.lower() or row["result"]["final_dir"]


def test_crashing_child_fails_the_job_with_its_error(jclient, jenv, tmp_path):
    engine = jenv.app.state.engine
    job = _job_on_a_line_without_a_model(jclient, jenv, tmp_path, "broken")
    assert supervise(job["id"], jenv.settings, engine) == "failed"
    with jenv.app.state.engine.connect() as conn:
        row = jobs.get_job(conn, job["id"])
    assert row["status"] == "failed" and row["finished_at"] is not None
    assert "Traceback" in row["error"] and row["attempt"] == 1


def test_settings_reach_the_child_exactly(monkeypatch):
    """Every setting, None included, survives the trip through PROSPECT_* variables."""
    from service.settings import Settings
    from worker.job_supervisor import settings_env

    s = Settings(base_model="/models/x", gate_task_evaluator=None, gate_min_margin=None,
                 default_job_params={"beta": 0.2}, holdout_fraction=0.1)
    for key, value in settings_env(s).items():
        monkeypatch.setenv(key, value)
    assert Settings().model_dump() == s.model_dump()


def test_a_slow_reference_snapshot_keeps_the_attempt_alive(jclient, jenv, tmp_path, monkeypatch):
    """Taking π_ref (download, hash, copy) ran before the heartbeats started: a snapshot longer
    than heartbeat_timeout_s made the reconciler re-queue a healthy attempt and, attempt after
    attempt, fail the job (a helper's review)."""
    import time

    import worker.job_supervisor as js

    seed_feedback(jclient, jenv, n=60)
    engine = jenv.app.state.engine
    settings = jenv.settings.model_copy(update={"heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 1.0})
    with engine.begin() as conn:
        put_line(conn, "slow-snapshot", str(tmp_path), feedback="all")
    job = jobs.create_job(engine, settings, line="slow-snapshot", params=JobParams(max_steps=3),
                          filters=JobFilters())
    assert job["reference_snapshot_id"] is None
    seen = {}

    def slow_reference(engine_, settings_, line):
        time.sleep(2.0)  # twice the heartbeat timeout
        seen["report"] = jobs.reconcile(engine, settings)
        raise RuntimeError("snapshot stopped by the test")

    monkeypatch.setattr(js, "current_reference", slow_reference)
    with pytest.raises(RuntimeError):
        supervise(job["id"], settings, engine)
    assert job["id"] not in seen["report"].requeued and job["id"] not in seen["report"].failed
    with engine.connect() as conn:
        row = jobs.get_job(conn, job["id"])
    # the attempt still owned the job: its own failure was recorded, not a lost worker's
    assert row["status"] == "failed" and "snapshot stopped by the test" in row["error"] and row["attempt"] == 1


def test_a_database_outage_while_the_child_starts_interrupts_not_fails(jclient, jenv, monkeypatch):
    """Reading the job's data meets a database that went away: the attempt is interrupted (the
    reconciler re-queues it), not the job failed for good with a traceback."""
    from sqlalchemy.exc import OperationalError

    import worker.job_child as jc

    engine, job, claim = _claimed(jclient, jenv)

    def down(*_a, **_k):
        raise OperationalError("SELECT feedback_events", {}, Exception("server closed"))

    monkeypatch.setattr(jc, "iter_selected", down)
    assert jc.run(job["id"], claim.token, jenv.settings) == jc.EXIT_INTERRUPTED
    with engine.connect() as conn:
        row = jobs.get_job(conn, job["id"])
    assert row["status"] == "running" and row["error"] is None


@pytest.mark.parametrize("failures", [2, 4])  # 4: the in-run flushes and the first one after it
def test_a_database_blip_during_training_does_not_fail_the_job(jclient, jenv, monkeypatch, failures):
    """The child's per-second writes (metrics, the cancel check) had no guard: one
    OperationalError while Postgres restarted failed a long run for good (status failed, no
    re-queue), where the supervisor's own heartbeat and cancel check ride it out."""
    import time
    import types

    from sqlalchemy.exc import OperationalError

    import worker.job_child as jc

    engine, job, claim = _claimed(jclient, jenv)
    down = OperationalError("UPDATE training_jobs", {}, Exception("server closed"))
    flushes, checks = [], []
    real_progress = jc.record_progress

    def progress(engine_, claim_, rows, total_steps=None, data=None):
        if rows:
            flushes.append(len(rows))
            if len(flushes) <= failures:  # the first flushes meet a database that is down
                raise down
        return real_progress(engine_, claim_, rows, total_steps=total_steps, data=data)

    def cancel_check(engine_, job_id):
        checks.append(job_id)
        raise down

    clock = iter(range(0, 10**6, 2))  # every step is "a second later": flush and check each
    monkeypatch.setattr(jc, "time", types.SimpleNamespace(monotonic=lambda: next(clock),
                                                          sleep=time.sleep))
    monkeypatch.setattr(jc, "record_progress", progress)
    monkeypatch.setattr(jc, "cancel_requested", cancel_check)
    assert jc.run(job["id"], claim.token, jenv.settings) == jc.EXIT_OK
    assert len(flushes) >= 3 and checks
    with engine.connect() as conn:
        row = jobs.get_job(conn, job["id"])
        steps = [m["step"] for m in jobs.job_metrics(conn, job["id"], 0, 100)]
    assert row["status"] == "succeeded" and row["step"] == 3 and row["error"] is None
    assert steps == [1, 2, 3]


def test_an_earlier_attempt_still_holding_the_folder_interrupts_not_fails(jclient, jenv):
    """A re-queued attempt waits for the previous attempt's process (still saving after its
    supervisor died) to let go of the output folder. When the wait ran out, the catch-all
    finished the job as failed for good; it is the case the job's attempts exist for."""
    import fcntl

    import worker.job_child as jc

    seed_feedback(jclient, jenv, n=60)
    engine = jenv.app.state.engine
    job = _create(jenv, max_steps=3)
    claim = jobs.claim(engine, job["id"], "host-a", jenv.settings)
    with engine.connect() as conn:
        out = Path(jobs.get_job(conn, job["id"])["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".attempt.lock", "w") as held:  # the earlier attempt's process
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        settings = jenv.settings.model_copy(update={"cancel_grace_s": 0.2})
        assert jc.run(job["id"], claim.token, settings) == jc.EXIT_INTERRUPTED
    with engine.connect() as conn:
        row = jobs.get_job(conn, job["id"])
    # still this attempt's: the reconciler re-queues it once its heartbeat stops
    assert row["status"] == "running" and row["attempt_token"] == claim.token
    assert row["error"] is None


@pytest.mark.timeout(60)  # without the limit the child sleeps 600 s
@pytest.mark.parametrize("on_sigterm", ["ignore", "exit_interrupted"])
def test_a_hanging_training_child_fails_the_job_after_job_max_runtime(jclient, jenv, tmp_path,
                                                                      monkeypatch, on_sigterm):
    """A hung child (NCCL, a deadlocked data loader) kept its supervisor heartbeating, so the
    job stayed running and held the GPU worker forever. Past PROSPECT_JOB_MAX_RUNTIME_S it is
    stopped and the job failed with that reason, not left for the reconciler to re-queue, even
    when the child saved a checkpoint on the SIGTERM and exited "interrupted" as job_child does."""
    import sys
    import time

    import worker.job_supervisor as js
    from worker.job_child import EXIT_INTERRUPTED

    engine = jenv.app.state.engine
    job = _job_on_a_line_without_a_model(jclient, jenv, tmp_path, "hangs")
    states = Path(jobs.job_output_dir(jenv.settings, "hangs", job["id"])) / "checkpoints" / "step-2"
    states.mkdir(parents=True)  # an earlier attempt's resume state
    handler = ("signal.SIG_IGN" if on_sigterm == "ignore"
               else f"lambda *_: (print('saved', flush=True), sys.exit({EXIT_INTERRUPTED}))")
    code = (f"import signal, sys, time; signal.signal(signal.SIGTERM, {handler}); "
            "print('training...', flush=True); time.sleep(600)")
    monkeypatch.setattr(js, "child_argv",
                        lambda settings, job_id, token: [sys.executable, "-c", code])
    settings = jenv.settings.model_copy(update={
        "job_max_runtime_s": 1.0, "cancel_grace_s": 0.5, "heartbeat_interval_s": 0.2})
    t0 = time.monotonic()
    assert supervise(job["id"], settings, engine) == "failed"
    assert time.monotonic() - t0 < 30
    with engine.connect() as conn:
        row = jobs.get_job(conn, job["id"])
    assert row["status"] == "failed" and row["attempt"] == 1 and row["finished_at"] is not None
    assert "PROSPECT_JOB_MAX_RUNTIME_S=1s" in row["error"] and "training..." in row["error"]
    assert states.is_dir()  # a re-run can resume from it
    # nothing left for the reconciler to re-queue
    report = jobs.reconcile(engine, settings.model_copy(update={"heartbeat_timeout_s": 0.01}))
    assert job["id"] not in report.requeued and job["id"] not in report.to_send
