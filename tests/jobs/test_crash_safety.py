"""A worker SIGKILLed mid-job, and a broker that lost its queue: Postgres still knows the job,
beat's reconciler re-queues it, and the next attempt resumes from the last checkpoint."""

from __future__ import annotations

from pathlib import Path

import redis

from tests.jobs.conftest import REDIS_URL, seed_feedback, wait_for
from tests.jobs.test_e2e_worker import _finished, _job, _start


def test_sigkilled_worker_job_resumes_from_checkpoint(jclient, jenv, start_worker, start_beat):
    seed_feedback(jclient, jenv, n=160)
    first = start_worker()
    start_beat()
    created = _start(jclient, jenv, max_steps=240, save_every_steps=10)
    out = None

    def checkpointed() -> bool:
        nonlocal out
        job = _job(jclient, jenv, created["id"])
        if job["output_dir"] is None or job["step"] < 25:
            return False
        out = Path(job["output_dir"])
        return any((out / "checkpoints").glob("step-*"))

    wait_for(checkpointed, 120, "a checkpoint of the first attempt")
    first.kill()
    killed_at = _job(jclient, jenv, created["id"])["step"]
    assert killed_at < 240, "the job finished before the kill; make it longer"

    start_worker()
    job = wait_for(lambda: _finished(jclient, jenv, created["id"]), 180,
                   "the job to finish on the restarted worker")
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 2
    resumed = job["result"]["resumed_from_step"]
    # The orphaned child gets SIGTERM from its parent-death signal and saves a checkpoint on
    # its way out, so the next attempt resumes at (or just after) the step the kill found.
    assert 10 <= resumed < 240 and resumed >= killed_at - 10
    assert job["step"] == job["total_steps"] == 240

    rows = jclient.get(f"/v1/jobs/{job['id']}/metrics", params={"limit": 1000},
                       headers=jenv.headers("read")).json()["metrics"]
    assert [r["step"] for r in rows] == list(range(1, 241))
    # Steps up to the checkpoint came from attempt 1, the rest were redone by attempt 2.
    assert all(r["attempt"] == 2 for r in rows if r["step"] > resumed)
    assert rows[0]["attempt"] == 1


def test_lost_broker_queue_is_reconciled(jclient, jenv, start_worker, start_beat):
    seed_feedback(jclient, jenv, n=80)
    created = _start(jclient, jenv, max_steps=4)
    # The broker "restarts" and loses everything it held (no worker has taken the message).
    r = redis.Redis.from_url(REDIS_URL)
    prefix = jenv.settings.broker_key_prefix
    keys = list(r.scan_iter(match=f"{prefix}*"))
    assert keys, "the job message should be in Redis"
    r.delete(*keys)

    start_worker()
    beat = start_beat()
    job = wait_for(lambda: _finished(jclient, jenv, created["id"]), 120,
                   "the reconciler to re-send the job")
    assert job["status"] == "succeeded", (job["error"], beat.text()[-2000:])
    assert job["attempt"] == 1


def test_a_job_out_of_attempts_is_retried_and_resumes_its_checkpoint(jclient, jenv, start_worker,
                                                                     start_beat):
    """A job created with PROSPECT_JOB_MAX_ATTEMPTS=1 loses its worker mid-run: beat's
    reconciler fails it for good. POST /v1/jobs/{id}/retry queues the same job again with
    fresh attempts, and the next worker resumes it from the crashed attempt's checkpoint."""
    seed_feedback(jclient, jenv, n=160)
    settings = jenv.app.state.settings
    jenv.app.state.settings = settings.model_copy(update={"job_max_attempts": 1})
    try:
        created = _start(jclient, jenv, max_steps=120, save_every_steps=10)
    finally:
        jenv.app.state.settings = settings
    assert created["max_attempts"] == 1
    first = start_worker()
    beat = start_beat()
    out = None

    def checkpointed() -> bool:
        nonlocal out
        job = _job(jclient, jenv, created["id"])
        if job["output_dir"] is None or job["step"] < 15:
            return False
        out = Path(job["output_dir"])
        return any((out / "checkpoints").glob("step-*"))

    wait_for(checkpointed, 120, "a checkpoint of the first attempt")
    first.kill()
    start_worker()  # runs beat's reconciler (the default queue), and later the retried job
    job = wait_for(lambda: _finished(jclient, jenv, created["id"]), 60,
                   "the reconciler to give up on the job")
    assert job["status"] == "failed" and "gave up after 1 attempts" in job["error"], (
        job, beat.text()[-2000:])
    assert job["step"] < 120, "the job finished before the kill; make it longer"

    r = jclient.post(f"/v1/jobs/{created['id']}/retry", headers=jenv.headers("admin"))
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued" and r.json()["enqueued"] is True
    assert r.json()["max_attempts"] == 1 + settings.job_max_attempts

    job = wait_for(lambda: _finished(jclient, jenv, created["id"]), 180,
                   "the retried job to finish")
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 2 and job["retries"] == 1
    assert job["retry_history"][0]["status"] == "failed"
    assert job["result"]["resumed_from_step"] >= 10
    assert job["step"] == job["total_steps"] == 120
