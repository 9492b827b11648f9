"""The registry through real processes: Postgres, Redis, a `prospect worker` (gpu,default) and
`prospect beat`. A job's success sends its evaluation (prospect.evaluate_job, run as a child
process on the gpu queue); a succeeded job whose evaluation message was lost is found by the
beat's gate sweep; a promotion's π_ref snapshot is taken by the worker; the beat's guard rolls
a worse canary back; the webhook receives it all."""

from __future__ import annotations

import json
import random
import secrets
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service import registry
from service.lines import put_line
from service.models import reference_snapshots, training_jobs
from tests.conftest import Env, make_env
from tests.jobs.conftest import REDIS_URL, Proc, process_env, seed_feedback, wait_for
from tests.registry.test_notify import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def wenv(pg_url: str, toy_folder: Path, tmp_path: Path, redis_ok: None,
         receiver: Receiver) -> Iterator[Env]:
    env = make_env(
        "postgres", pg_url, broker_url=REDIS_URL,
        broker_key_prefix=f"prospect-reg-{secrets.token_hex(4)}:",
        artifacts_root=str(tmp_path / "artifacts"), base_model=str(toy_folder),
        heartbeat_interval_s=0.5, reconcile_interval_s=0, retrain_check_interval_s=0,
        snapshot_interval_s=0, retention_interval_s=0, max_events_per_user=0,
        holdout_fraction=0.3, gate_min_holdout_examples=5, gate_n_generate=8,
        gate_max_new_tokens=4, gate_min_margin=None, gate_max_kl=None,
        gate_max_length_drift=None, gate_sweep_interval_s=1.0, gate_resend_after_s=2.0,
        guard_interval_s=1.0, guard_min_samples=50, serving_cache_ttl_s=0.0,
        webhook_url=receiver.url, webhook_backoff_s=0.0, notify_interval_s=1.0)
    yield env
    env.app.state.engine.dispose()


@pytest.fixture
def redis_ok() -> None:
    import redis

    redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()


@pytest.fixture
def procs(wenv: Env, tmp_path: Path) -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def _start(wenv: Env, tmp_path: Path, procs: list[Proc], what: str) -> Proc:
    if what == "worker":
        argv = [sys.executable, "-m", "service.cli", "worker", "--queues", "gpu,default",
                "--name", f"reg-{secrets.token_hex(3)}@%h"]
        ready = "ready."
    else:
        argv = [sys.executable, "-m", "service.cli", "beat", "--schedule",
                str(tmp_path / "beat-schedule")]
        ready = "beat: Starting"
    from worker.gate import child_env

    env = {**process_env(wenv), **child_env(wenv.settings)}
    p = Proc(argv, env, tmp_path / f"{what}.log", ready=ready)
    procs.append(p)
    return p


def _ckpt_of(env: Env, job_id: int) -> dict[str, Any] | None:
    with env.app.state.engine.connect() as conn:
        return registry.checkpoint_for_job(conn, job_id)


def test_job_to_gate_to_rollout_through_celery(wenv, tmp_path, procs, receiver):
    line = f"w{secrets.token_hex(3)}"
    with wenv.app.state.engine.begin() as conn:
        put_line(conn, line, wenv.settings.base_model)
    worker = _start(wenv, tmp_path, procs, "worker")
    with TestClient(wenv.app, raise_server_exceptions=False) as client:
        # what the new line served: its scope (`served`) keeps only these
        seed_feedback(client, wenv, n=80, prefix=f"{line}-", model_version=f"{line}-base")
        r = client.post("/v1/jobs", json={"line": line, "params": {
            "max_steps": 3, "microbatch_size": 8, "learning_rate": 1e-3, "max_length": 32}},
            headers=wenv.headers("admin"))
        assert r.status_code == 202 and r.json()["enqueued"], r.text
        job_id = r.json()["id"]
        # the train task finishes the job and sends its evaluation: the gate decides
        first = wait_for(lambda: (c := _ckpt_of(wenv, job_id)) and c["stage"] != "pending" and c,
                         180, "the gate's decision", every=0.5)
        assert first["stage"] == "candidate", (first["reason"], worker.text()[-3000:])
        assert first["metrics"]["holdout"]["n_examples"] >= 5
        gate_log = Path(client.get(f"/v1/jobs/{job_id}", headers=wenv.headers("read"))
                        .json()["output_dir"]) / "logs" / "gate-1.log"
        assert gate_log.exists()  # it ran as a child process

        # promote: the worker takes the new production's π_ref snapshot
        r = client.post(f"/v1/checkpoints/{first['id']}/promote",
                        json={"stage": "production"}, headers=wenv.headers("admin"))
        assert r.status_code == 200 and r.json()["enqueued"], r.text
        snap_id = r.json()["reference_snapshot_id"]

        def snap_status() -> str | None:
            with wenv.app.state.engine.connect() as conn:
                s = conn.execute(select(reference_snapshots.c.status).where(
                    reference_snapshots.c.id == snap_id)).scalar_one()
            return s if s != "pending" else None

        assert wait_for(snap_status, 60, "the π_ref snapshot") in ("ready", "unchanged")

        # a succeeded job whose evaluation message was lost: the beat's sweep finds it
        with wenv.app.state.engine.begin() as conn:
            job = dict(conn.execute(select(training_jobs).where(
                training_jobs.c.id == job_id)).mappings().one())
            lost = conn.execute(training_jobs.insert().values(
                **{k: v for k, v in job.items() if k not in ("id", "created_at")},
                created_at=datetime.now(UTC)).returning(training_jobs.c.id)).scalar_one()
        assert _ckpt_of(wenv, lost) is None
        _start(wenv, tmp_path, procs, "beat")
        second = wait_for(lambda: (c := _ckpt_of(wenv, lost)) and c["stage"] != "pending" and c,
                          120, "the sweep's evaluation", every=0.5)
        assert second["stage"] == "candidate", second["reason"]

        # a canary that users like less: the beat's guard rolls it back
        r = client.post(f"/v1/checkpoints/{second['id']}/promote",
                        json={"stage": "canary", "percent": 50}, headers=wenv.headers("admin"))
        assert r.status_code == 200, r.text
        rng, events = random.Random(0), []
        for i in range(400):
            served = client.post("/v1/serve", json={"line": line, "user_id": f"u{i}"},
                                 headers=wenv.headers("ingest")).json()
            good = rng.random() < (0.2 if served["arm"] == "canary" else 0.9)
            events.append({"event_id": f"{line}-live-{i}", "prompt": "1+1=", "completion": "2",
                           "label": good, "model_version": served["model_version"],
                           "user_id": f"u{i}"})
        r = client.post("/v1/feedback/batch", json={"events": events},
                        headers=wenv.headers("ingest"))
        assert r.status_code == 207
        rolled = wait_for(lambda: (c := registry_get(wenv, second["id"]))["stage"] == "rejected"
                          and c, 60, "the guard's rollback", every=0.5)
        assert "guard" in rolled["reason"]

        # the webhook heard every step (beat delivers the outbox)
        def heard() -> list[str] | None:
            got = [json.loads(r["body"]) for r in receiver.requests]
            evs = [g["event"] for g in got if g.get("line") == line]
            return evs if "rolled_back" in evs else None

        evs = wait_for(heard, 60, "the webhook deliveries", every=0.5)
        assert evs.count("gate_passed") == 2 and evs.count("promoted") == 1, evs
        assert evs.index("canary_started") < evs.index("rolled_back"), evs


def registry_get(env: Env, cid: int) -> dict[str, Any]:
    with env.app.state.engine.connect() as conn:
        return registry.get_checkpoint(conn, cid)
