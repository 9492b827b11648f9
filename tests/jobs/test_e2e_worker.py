"""Jobs end to end: REST trigger -> Redis -> a real Celery worker -> training child -> Postgres.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import Env
from tests.jobs.conftest import seed_feedback, wait_for


def _job(client: Any, env: Env, job_id: int) -> dict[str, Any]:
    r = client.get(f"/v1/jobs/{job_id}", headers=env.headers("read"))
    assert r.status_code == 200, r.text
    return r.json()


def _start(client: Any, env: Env, **params: Any) -> dict[str, Any]:
    body = {"params": {"microbatch_size": 8, "learning_rate": 1e-3, **params}}
    r = client.post("/v1/jobs", json=body, headers=env.headers("admin"))
    assert r.status_code == 202, r.text
    return r.json()


def _finished(client: Any, env: Env, job_id: int) -> Any:
    job = _job(client, env, job_id)
    return job if job["status"] in ("succeeded", "failed", "cancelled") else None


def test_rest_trigger_runs_to_success(jclient, jenv, start_worker):
    from worker.kto.trainer import verify_manifest

    seed_feedback(jclient, jenv, n=120)
    worker = start_worker()
    created = _start(jclient, jenv, max_steps=8)
    assert created["status"] == "queued" and created["enqueued"] is True
    assert created["data"]["lambda_source"] == "balancer"

    job = wait_for(lambda: _finished(jclient, jenv, created["id"]), 120, "the job to finish")
    assert job["status"] == "succeeded", (job["error"], worker.text()[-3000:])
    assert job["attempt"] == 1 and job["step"] == job["total_steps"] == 8
    assert job["reference_snapshot_id"] is not None
    assert job["data"]["event_ids_sha256"] and job["data"]["n_examples"] > 0

    m = jclient.get(f"/v1/jobs/{job['id']}/metrics", headers=jenv.headers("read")).json()
    steps = [row["step"] for row in m["metrics"]]
    assert steps == list(range(1, 9))
    for name in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
                 "tokens_per_s", "grad_norm", "lr"):
        assert name in m["metrics"][-1]["metrics"], name

    final = Path(job["result"]["final_dir"])
    assert final.is_dir() and verify_manifest(final)
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["job_id"] == job["id"]
    assert manifest["reference_snapshot_id"] == job["reference_snapshot_id"]
    ref = jclient.get(f"/v1/references/{job['reference_snapshot_id']}",
                      headers=jenv.headers("read")).json()
    assert ref["status"] == "ready" and manifest["reference_content_hash"] == ref["content_hash"]
    # A finished job cannot be cancelled.
    r = jclient.post(f"/v1/jobs/{job['id']}/cancel", headers=jenv.headers("admin"))
    assert r.status_code == 409 and r.json()["error"] == "job_finished"


def test_duplicate_messages_start_one_run(jclient, jenv, start_worker):
    from service.queue import GPU_QUEUE, TRAIN_TASK, send

    seed_feedback(jclient, jenv, n=80)
    created = _start(jclient, jenv, max_steps=4)
    # The same message, delivered three more times (a redelivery, a duplicate publish, ...).
    for _ in range(3):
        assert send(jenv.app.state.celery, TRAIN_TASK, [created["id"]], queue=GPU_QUEUE)
    worker = start_worker()
    job = wait_for(lambda: _finished(jclient, jenv, created["id"]), 120, "the job to finish")
    assert job["status"] == "succeeded", job["error"]
    # Let the worker drain the duplicates, then check that none of them ran anything.
    wait_for(lambda: worker.text().count("not claimable") >= 3, 30, "duplicates to be skipped")
    job = _job(jclient, jenv, created["id"])
    assert job["attempt"] == 1
    rows = jclient.get(f"/v1/jobs/{job['id']}/metrics", headers=jenv.headers("read")).json()
    assert {r["attempt"] for r in rows["metrics"]} == {1}


def test_cancel_running_job(jclient, jenv, start_worker):
    seed_feedback(jclient, jenv, n=120)
    start_worker()
    created = _start(jclient, jenv, max_steps=5000, save_every_steps=10_000)
    wait_for(lambda: _job(jclient, jenv, created["id"])["step"] >= 3, 120, "training to start")
    r = jclient.post(f"/v1/jobs/{created['id']}/cancel", headers=jenv.headers("admin"))
    assert r.status_code == 202 and r.json()["cancel_requested"] is True
    job = wait_for(lambda: _finished(jclient, jenv, created["id"]), 30, "the cancel")
    assert job["status"] == "cancelled"
    assert job["step"] < 5000
    # A cancelled run keeps a checkpoint of where it stopped.
    assert job["result"] and Path(job["result"]["last_checkpoint"]).is_dir()
    # Cancelling again is idempotent.
    r = jclient.post(f"/v1/jobs/{created['id']}/cancel", headers=jenv.headers("admin"))
    assert r.status_code == 202 and r.json()["status"] == "cancelled"


def test_queued_job_cancelled_never_starts(jclient, jenv, start_worker):
    seed_feedback(jclient, jenv, n=80)
    created = _start(jclient, jenv, max_steps=4)  # no worker yet: the message waits in Redis
    r = jclient.post(f"/v1/jobs/{created['id']}/cancel", headers=jenv.headers("admin"))
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    worker = start_worker()
    wait_for(lambda: "not claimable" in worker.text(), 30, "the message to be consumed")
    job = _job(jclient, jenv, created["id"])
    assert job["status"] == "cancelled" and job["attempt"] == 0 and job["started_at"] is None
