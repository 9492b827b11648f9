"""Fixtures for the jobs tests: a real Postgres, a real Redis and real Celery worker / beat
processes started here (``prospect worker``, ``prospect beat``), a toy model made locally.

Each test session uses its own broker key prefix, so it never sees another run's queues.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.conftest import Env, make_env  # noqa: E402

REDIS_URL = os.environ.get("PROSPECT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.kto import toy

    return toy.make_toy_folder(tmp_path_factory.mktemp("toy") / "model", seed=0)


@pytest.fixture(scope="session")
def redis_ok() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:  # pragma: no cover - environment problem
        pytest.fail(f"Redis is required for these tests ({REDIS_URL}): {exc}. `.ci/run` starts it.")


@pytest.fixture(scope="session")
def jenv(pg_url: str, toy_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
         redis_ok: None) -> Env:
    """API + keys on the session's Postgres, wired to Redis, with fast job timings."""
    return make_env(
        "postgres", pg_url,
        broker_url=REDIS_URL,
        broker_key_prefix=f"prospect-test-{secrets.token_hex(4)}:",
        artifacts_root=str(tmp_path_factory.mktemp("artifacts")),
        base_model=str(toy_model_dir),
        heartbeat_interval_s=0.5,
        heartbeat_timeout_s=4.0,
        requeue_after_s=3.0,
        reconcile_interval_s=1.0,
        retrain_check_interval_s=0,
        snapshot_interval_s=0,
        cancel_grace_s=15.0,
        max_events_per_user=0,
        retrain_min_events=20,
    )


#: Kept between tests: keys, lines and π_ref snapshots (snapshots are slow-ish to retake).
_KEEP = {"api_keys", "model_lines", "reference_snapshots"}


def clear_jobs(env: Env) -> None:
    """Empty jobs, feedback and everything that refers to them. TRUNCATE, because the audit
    table refuses DELETE by design."""
    from sqlalchemy import inspect, text

    with env.app.state.engine.begin() as conn:
        names = sorted(set(inspect(conn).get_table_names()) - _KEEP - {"alembic_version"})
        conn.execute(text(f"TRUNCATE {', '.join(names)} CASCADE"))


@pytest.fixture
def jclient(jenv: Env) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    clear_jobs(jenv)
    with TestClient(jenv.app, raise_server_exceptions=False) as c:
        yield c


def seed_feedback(client: Any, env: Env, n: int = 120, desirable_fraction: float = 0.3,
                  users: int = 12, seed: int = 0, prefix: str = "e",
                  model_version: str = "base") -> list[dict[str, Any]]:
    """Post toy-task feedback through the real API (a line with the `served` feedback scope
    trains only on its own versions: pass ``model_version="<line>-base"``)."""
    from worker.kto import toy

    events = []
    for i, ex in enumerate(toy.make_feedback(n, desirable_fraction, seed=seed)):
        events.append({"event_id": f"{prefix}{seed}-{i}", "prompt": ex["prompt"],
                       "completion": ex["completion"], "label": "up" if ex["label"] else "down",
                       "model_version": model_version, "user_id": f"user-{i % users}"})
    for k in range(0, len(events), 500):
        r = client.post("/v1/feedback/batch", json={"events": events[k:k + 500]},
                        headers=env.headers("ingest"))
        assert r.status_code == 207, r.text
    return events


def wait_for(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Proc:
    """A `prospect worker` or `prospect beat` process with its log file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, ready: str | None):
        self.log = log
        self._fh = open(log, "ab")  # noqa: SIM115
        self.p = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=self._fh,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        if ready:
            wait_for(lambda: ready in self.text() or self.p.poll() is not None, 60,
                     f"{argv[1:3]} to start")
            assert self.p.poll() is None, f"process exited:\n{self.text()[-3000:]}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the process only (its training child dies through its parent-death signal)."""
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
                self.p.wait(20)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(10)
        self._fh.close()


def process_env(env: Env) -> dict[str, str]:
    from worker.job_supervisor import settings_env

    return {**os.environ, **settings_env(env.settings), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}


@pytest.fixture
def start_worker(jenv: Env, tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    procs: list[Proc] = []
    counter = iter(range(100))

    def start(queues: str = "gpu,default") -> Proc:
        n = next(counter)
        proc = Proc([sys.executable, "-m", "service.cli", "worker", "--queues", queues,
                     "--name", f"test{n}-{secrets.token_hex(3)}@%h"],
                    process_env(jenv), tmp_path / f"worker{n}.log", ready="ready.")
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        p.stop()


@pytest.fixture
def start_beat(jenv: Env, tmp_path: Path) -> Iterator[Callable[[], Proc]]:
    procs: list[Proc] = []

    def start() -> Proc:
        proc = Proc([sys.executable, "-m", "service.cli", "beat", "--schedule",
                     str(tmp_path / "beat-schedule")],
                    process_env(jenv), tmp_path / "beat.log", ready="beat: Starting")
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        p.stop()
