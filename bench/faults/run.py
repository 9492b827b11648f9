"""Fault scenarios: kill or stop a part under load and check that nothing acknowledged is lost,
nothing is stored twice, no 500 is answered, and jobs recover or fail cleanly.

Scenarios that stop a server use a throw-away one on another port (a private Postgres cluster,
a private Redis); the disk-full scenario mounts a small tmpfs (needs root). Nothing else on the
machine is disturbed. Results go to docs/reliability.md.

    .venv/bin/python bench/faults/run.py all            # or: api-kill pg-restart redis-restart
                                                        #     worker-kill disk-full
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.faults.common import (  # noqa: E402
    Proc,
    ThrowawayPostgres,
    ThrowawayRedis,
    drop_database,
    env_for,
    free_port,
    fresh_database,
    prepare,
    retrying_load,
    start_api,
    stored_event_ids,
    table,
    toy_model,
    wait_until,
)
from service.settings import Settings  # noqa: E402

RESULTS: list[str] = []


def _pcts(lat: list[float]) -> str:
    if not lat:
        return "-"
    q = statistics.quantiles(lat, n=100)
    return f"p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms"


def _load_in_thread(base: str, key: str, seconds: float, out: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        out["stats"] = asyncio.run(retrying_load(base, key, seconds))

    t = threading.Thread(target=run)
    t.start()
    return t


def api_kill(workdir: Path) -> bool:
    """SIGKILL the whole API (gunicorn master and workers) mid-load; clients retry with the same
    event ids; after a restart the table holds exactly the acknowledged events."""
    url = fresh_database()
    try:
        settings = Settings(database_url=url, user_id_key="fault-user-id-key-0123456789")
        keys = prepare(settings)
        port = free_port()
        api = start_api(settings, port, workdir / "api-kill.log")
        out: dict[str, Any] = {}
        loader = _load_in_thread(f"http://127.0.0.1:{port}", keys["ingest"], 24, out)
        time.sleep(8)
        t_kill = time.monotonic()
        api.killpg(signal.SIGKILL)
        time.sleep(2)
        api = start_api(settings, port, workdir / "api-kill.log")
        downtime = time.monotonic() - t_kill
        loader.join()
        api.killpg(signal.SIGTERM)
        stats = out["stats"]
        n_rows, stored = stored_event_ids(url)
        ok = (stored == stats.acknowledged and n_rows == len(stored)
              and stats.server_errors == 0)
        RESULTS.append(table("API killed mid-load (SIGKILL of gunicorn and its workers)", [
            ("requests (incl. retries)", stats.requests),
            ("connection errors, retried", stats.connection_errors),
            ("events acknowledged", len(stats.acknowledged)),
            ("rows stored / distinct event ids", f"{n_rows} / {len(stored)}"),
            ("acknowledged but missing", len(stats.acknowledged - stored)),
            ("stored but never acknowledged", len(stored - stats.acknowledged)),
            ("5xx other than 503", stats.server_errors),
            ("API down (kill to ready)", f"{downtime:.1f} s"),
            ("latency", _pcts(stats.latencies)),
            ("result", "PASS" if ok else "FAIL"),
        ]))
        return ok
    finally:
        drop_database(url)


def pg_restart(workdir: Path) -> bool:
    """Stop a private Postgres for a few seconds mid-load: 503 + Retry-After meanwhile, no 500,
    then full recovery with exactly the acknowledged events stored."""
    pg = ThrowawayPostgres()
    try:
        settings = Settings(database_url=pg.url, user_id_key="fault-user-id-key-0123456789",
                            db_connect_timeout_s=2, db_pool_timeout_s=2)
        keys = prepare(settings)
        port = free_port()
        api = start_api(settings, port, workdir / "pg-restart.log")
        out: dict[str, Any] = {}
        loader = _load_in_thread(f"http://127.0.0.1:{port}", keys["ingest"], 24, out)
        time.sleep(6)
        pg.stop()
        time.sleep(5)
        pg.start()
        t_up = time.monotonic()
        # Recovery: the first request after the restart answers 200 (no manual step).
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200,
                   30, "readiness after the restart")
        recovery = time.monotonic() - t_up
        loader.join()
        api.killpg(signal.SIGTERM)
        stats = out["stats"]
        n_rows, stored = stored_event_ids(pg.url)
        n503 = stats.statuses.get(503, 0)
        ok = (stored == stats.acknowledged and n_rows == len(stored)
              and stats.server_errors == 0 and n503 > 0 and stats.retry_after_seen == n503)
        RESULTS.append(table("Postgres stopped for 5 s mid-load (private cluster)", [
            ("requests (incl. retries)", stats.requests),
            ("answers", json.dumps(dict(sorted(stats.statuses.items())))),
            ("503 with Retry-After", f"{stats.retry_after_seen} of {n503}"),
            ("5xx other than 503", stats.server_errors),
            ("events acknowledged", len(stats.acknowledged)),
            ("rows stored / distinct", f"{n_rows} / {len(stored)}"),
            ("acknowledged but missing", len(stats.acknowledged - stored)),
            ("ready again after restart", f"{recovery:.1f} s"),
            ("result", "PASS" if ok else "FAIL"),
        ]))
        return ok
    finally:
        pg.close()


def _job_env(workdir: Path, url: str, broker: str, **extra: Any) -> Settings:
    model = workdir / "toy-model"
    if not model.exists():
        toy_model(model)
    return Settings(
        database_url=url, broker_url=broker, base_model=str(model),
        artifacts_root=str(extra.pop("artifacts_root", workdir / "artifacts")),
        user_id_key="fault-user-id-key-0123456789", heartbeat_interval_s=0.5,
        heartbeat_timeout_s=4, requeue_after_s=3, reconcile_interval_s=1,
        retrain_check_interval_s=0, snapshot_interval_s=0, max_events_per_user=0, **extra)


def _seed_and_jobs(settings: Settings, keys: dict[str, str], port: int, lines: list[str],
                   **params: Any) -> list[int]:
    from worker.kto import toy

    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=60) as http:
        rows = toy.make_feedback(120, 0.3, seed=0)
        events = [{"event_id": f"s{i}", "prompt": r["prompt"], "completion": r["completion"],
                   "label": "up" if r["label"] else "down", "model_version": "base",
                   "user_id": f"u{i % 10}"} for i, r in enumerate(rows)]
        h = {"Authorization": f"Bearer {keys['admin']}"}
        http.post("/v1/feedback/batch", json={"events": events}, headers=h).raise_for_status()
        ids = []
        for line in lines:
            if line != "default":
                http.put(f"/v1/lines/{line}", json={"base_model": settings.base_model},
                         headers=h).raise_for_status()
            r = http.post("/v1/jobs", json={"line": line, "params": {
                "learning_rate": 1e-3, **params}}, headers=h)
            r.raise_for_status()
            ids.append(r.json()["id"])
    return ids


def _job(url: str, job_id: int) -> dict[str, Any]:
    from sqlalchemy import create_engine

    from service.jobs import get_job

    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            return get_job(conn, job_id)
    finally:
        engine.dispose()


def _worker(settings: Settings, log: Path) -> Proc:
    proc = Proc([sys.executable, "-m", "service.cli", "worker", "--queues", "gpu,default",
                 "--name", f"fault-{os.getpid()}-{time.monotonic_ns()}@%h"],
                env_for(settings), log)
    wait_until(lambda: "ready." in proc.text(), 90, "the worker")
    return proc


def _beat(settings: Settings, workdir: Path) -> Proc:
    proc = Proc([sys.executable, "-m", "service.cli", "beat", "--schedule",
                 str(workdir / f"beat-{time.monotonic_ns()}")], env_for(settings),
                workdir / "beat.log")
    wait_until(lambda: "beat: Starting" in proc.text(), 60, "beat")
    return proc


@contextlib.contextmanager
def _job_scenario() -> Iterator[tuple[ThrowawayRedis, str, list[Proc]]]:
    """A private Redis, a fresh database and a list for the processes the scenario starts, all
    torn down however the scenario ends."""
    redis = ThrowawayRedis()
    url = fresh_database()
    procs: list[Proc] = []
    try:
        yield redis, url, procs
    finally:
        for p in procs:
            p.killpg(signal.SIGTERM)
        redis.close()
        drop_database(url)


def redis_restart(workdir: Path) -> bool:
    """Jobs queued, then the (private) Redis crashes and comes back empty: beat's reconciler
    re-sends what Postgres says is queued and the jobs run."""
    with _job_scenario() as (redis, url, procs):
        settings = _job_env(workdir, url, redis.url)
        keys = prepare(settings)
        port = free_port()
        procs.append(start_api(settings, port, workdir / "redis-api.log"))
        job_ids = _seed_and_jobs(settings, keys, port, ["default", "second"], max_steps=4)
        import redis as redis_lib

        queued_msgs = redis_lib.Redis(port=redis.port).llen("gpu")
        redis.kill()
        redis.start()
        lost = redis_lib.Redis(port=redis.port).llen("gpu")
        t = time.monotonic()
        procs.append(_worker(settings, workdir / "redis-worker.log"))
        procs.append(_beat(settings, workdir))
        done = wait_until(lambda: all(_job(url, j)["status"] in ("succeeded", "failed")
                                      for j in job_ids), 180, "the jobs")
        took = time.monotonic() - t
        statuses = [_job(url, j)["status"] for j in job_ids]
        ok = bool(done) and statuses == ["succeeded"] * len(job_ids) and lost == 0
        RESULTS.append(table("Redis crashed with jobs queued (private Redis, no persistence)", [
            ("messages in queue gpu before / after the crash", f"{queued_msgs} / {lost}"),
            ("jobs", ", ".join(f"{j}: {s}" for j, s in zip(job_ids, statuses))),
            ("worker + beat start to all jobs done", f"{took:.1f} s"),
            ("attempts", ", ".join(str(_job(url, j)["attempt"]) for j in job_ids)),
            ("result", "PASS" if ok else "FAIL"),
        ]))
        return ok


def worker_kill(workdir: Path) -> bool:
    """SIGKILL the worker AND its training child (a node loss: no chance to save); the job
    resumes from the last complete checkpoint; no half-written checkpoint is ever used."""
    from worker.kto.trainer import verify_manifest

    with _job_scenario() as (redis, url, procs):
        settings = _job_env(workdir, url, redis.url)
        keys = prepare(settings)
        port = free_port()
        procs.append(start_api(settings, port, workdir / "wk-api.log"))
        worker = _worker(settings, workdir / "wk-worker.log")
        procs.append(_beat(settings, workdir))
        (job_id,) = _seed_and_jobs(settings, keys, port, ["default"], max_steps=300,
                                   save_every_steps=10)
        wait_until(lambda: _job(url, job_id)["step"] >= 35, 180, "step 35")
        # The whole node goes: the supervisor and the child's own process group, at once.
        children = subprocess.run(["pgrep", "-f", f"worker.job_child --job-id {job_id}"],
                                  capture_output=True, text=True).stdout.split()
        for pid in children:
            os.killpg(int(pid), signal.SIGKILL)
        worker.killpg(signal.SIGKILL)
        killed_at = _job(url, job_id)["step"]
        out = Path(_job(url, job_id)["output_dir"])
        ckpts = sorted((out / "checkpoints").glob("step-*"))
        partial = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
        all_valid = all(verify_manifest(p) for p in ckpts)
        procs.append(_worker(settings, workdir / "wk-worker2.log"))
        wait_until(lambda: _job(url, job_id)["status"] in ("succeeded", "failed"), 300,
                   "the job to finish")
        job = _job(url, job_id)
        final_ok = job["status"] == "succeeded" and verify_manifest(job["result"]["final_dir"])
        resumed = job["result"]["resumed_from_step"] if job["result"] else None
        ok = (final_ok and all_valid and resumed is not None
              and resumed == int(ckpts[-1].name.split("-")[1]) and job["attempt"] == 2)
        RESULTS.append(table("Worker and training child SIGKILLed mid-job", [
            ("killed at step", killed_at),
            ("complete checkpoints on disk", ", ".join(p.name for p in ckpts)),
            ("all with valid manifests", all_valid),
            ("temporary (hidden) folders left", partial or "none"),
            ("resumed from step", resumed),
            ("final status / attempts", f"{job['status']} / {job['attempt']}"),
            ("final model manifest valid", final_ok),
            ("result", "PASS" if ok else "FAIL"),
        ]))
        return ok


def disk_full(workdir: Path) -> bool:
    """The artifacts filesystem fills up while the job saves a checkpoint: the job fails with
    the reason, earlier checkpoints stay intact and no half-written folder is left."""
    from worker.kto.trainer import verify_manifest

    mnt = Path(tempfile.mkdtemp(prefix="prospect-smallfs-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    try:
        with _job_scenario() as (redis, url, procs):
            settings = _job_env(workdir, url, redis.url, artifacts_root=mnt / "artifacts")
            keys = prepare(settings)
            port = free_port()
            procs.append(start_api(settings, port, workdir / "df-api.log"))
            procs.append(_worker(settings, workdir / "df-worker.log"))
            (job_id,) = _seed_and_jobs(settings, keys, port, ["default"], max_steps=400,
                                       save_every_steps=10)
            wait_until(lambda: _job(url, job_id)["step"] >= 25, 180, "step 25")
            out = Path(_job(url, job_id)["output_dir"])
            # Fill the disk: leave less than one checkpoint's worth.
            free = shutil.disk_usage(mnt).free
            with open(mnt / "filler", "wb") as f:
                f.write(b"\0" * max(0, free - 64 * 1024))
            before = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
            wait_until(lambda: _job(url, job_id)["status"] in ("failed", "succeeded"), 180,
                       "the job to stop")
            job = _job(url, job_id)
            ckpts = sorted((out / "checkpoints").glob("step-*"))
            hidden = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
            intact = bool(ckpts) and all(verify_manifest(p) for p in ckpts)
            reason = "No space left on device" in (job["error"] or "")
            ok = job["status"] == "failed" and reason and intact and not hidden
            RESULTS.append(table("Artifacts disk full while saving a checkpoint (64 MiB tmpfs)", [
                ("checkpoints before the disk filled", ", ".join(before)),
                ("job status at step", f"{job['status']} at {job['step']}"),
                ("error names the cause", reason),
                ("error, last line", (job["error"] or "").strip().splitlines()[-1][:100]
                 if job["error"] else "-"),
                ("checkpoints left, all valid", f"{', '.join(p.name for p in ckpts)}: {intact}"),
                ("half-written folders left", hidden or "none"),
                ("result", "PASS" if ok else "FAIL"),
            ]))
            return ok
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        shutil.rmtree(mnt, ignore_errors=True)


SCENARIOS = {"api-kill": api_kill, "pg-restart": pg_restart, "redis-restart": redis_restart,
             "worker-kill": worker_kill, "disk-full": disk_full}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenarios", nargs="*", default=["all"])
    args = ap.parse_args()
    names = list(SCENARIOS) if args.scenarios in (["all"], []) else args.scenarios
    workdir = Path(tempfile.mkdtemp(prefix="prospect-faults-"))
    results = {}
    for name in names:
        t = time.monotonic()
        try:
            results[name] = SCENARIOS[name](workdir)
        except Exception as exc:  # noqa: BLE001 - report and go on
            RESULTS.append(f"## {name}\n  ERROR {type(exc).__name__}: {exc}")
            results[name] = False
        RESULTS[-1] += f"\n  ({time.monotonic() - t:.0f} s)"
        print(RESULTS[-1], flush=True)
    print(f"\nlogs: {workdir}\nrerun: .venv/bin/python bench/faults/run.py {' '.join(names)}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
