"""Dashboard fixtures: private databases, a logged-in TestClient, seeding helpers, and (for
the browser tests) a real uvicorn server and Debian's chromium driven by Playwright.

The dashboard tests use their own databases (a fresh SQLite file and a fresh Postgres
database), not the shared session ones: they leave running jobs behind, which would make
the jobs tests' "one active job per line" checks fail.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import delete, insert, text

from tests.conftest import Env, make_env, migrated_pg_database

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "var" / "test-artifacts" / "dashboard"
CHROMIUM = os.environ.get("PROSPECT_TEST_CHROMIUM", "/usr/bin/chromium")
#: No network: nothing may phone home while the tests run.
CHROMIUM_ARGS = [
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--no-first-run",
    "--disable-domain-reliability", "--disable-client-side-phishing-detection",
    "--metrics-recording-only", "--no-default-browser-check", "--disable-dev-shm-usage",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
]


# ---- databases -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def dash_sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    from service import migrate
    from service.settings import Settings

    url = f"sqlite:///{tmp_path_factory.mktemp('dash-sqlite') / 'prospect.db'}"
    migrate.upgrade(Settings(database_url=url))
    return url


@pytest.fixture(scope="session")
def dash_pg_url() -> Iterator[str]:
    yield from migrated_pg_database("prospect_dash")


def wipe(env: Env) -> None:
    """Empty the tables the dashboard reads (children first)."""
    from sqlalchemy import inspect

    from service.models import feedback_events, job_metrics, training_jobs

    with env.app.state.engine.begin() as conn:
        names = set(inspect(conn).get_table_names())
        for extra in ("rollout_events", "notifications", "checkpoints"):
            if extra in names:
                if extra == "rollout_events" and conn.dialect.name == "sqlite":
                    conn.exec_driver_sql("DROP TRIGGER IF EXISTS rollout_events_no_delete")
                    conn.exec_driver_sql(f"DELETE FROM {extra}")
                    conn.exec_driver_sql(
                        "CREATE TRIGGER rollout_events_no_delete BEFORE DELETE ON "
                        "rollout_events BEGIN SELECT RAISE(ABORT, "
                        "'rollout_events is append-only'); END")
                elif extra == "rollout_events":
                    conn.exec_driver_sql("ALTER TABLE rollout_events DISABLE TRIGGER USER")
                    conn.exec_driver_sql(f"DELETE FROM {extra}")
                    conn.exec_driver_sql("ALTER TABLE rollout_events ENABLE TRIGGER USER")
                else:
                    conn.exec_driver_sql(f"DELETE FROM {extra}")
        conn.execute(delete(job_metrics))
        conn.execute(delete(training_jobs))
        conn.execute(delete(feedback_events))


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def dash_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Env:
    """An app on a private database, per backend, with a SQLite broker (queue depth)."""
    url = request.getfixturevalue("dash_pg_url" if request.param == "postgres"
                                  else "dash_sqlite_url")
    broker = tmp_path_factory.mktemp(f"broker-{request.param}") / "broker.db"
    return make_env(request.param, url, broker_url=f"sqla+sqlite:///{broker}",
                    key_cache_ttl_s=0)


# ---- a logged-in client ----------------------------------------------------------------------

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


def login(client: Any, key: str, next_path: str = "/dashboard") -> Any:
    """GET the form (login CSRF cookie + token), POST the key; returns the POST response."""
    form = client.get("/dashboard/login")
    assert form.status_code == 200, form.text
    token = CSRF_RE.search(form.text).group(1)
    return client.post("/dashboard/login", data={"key": key, "csrf_token": token,
                                                 "next": next_path}, follow_redirects=False)


def csrf_of(html: str) -> str:
    m = CSRF_RE.search(html)
    assert m, "no csrf_token in the page"
    return m.group(1)


@pytest.fixture
def dash_client(dash_env: Env) -> Iterator[Any]:
    """A TestClient on https (the session cookie is Secure) with the tables emptied."""
    from fastapi.testclient import TestClient

    wipe(dash_env)
    with TestClient(dash_env.app, base_url="https://testserver",
                    raise_server_exceptions=False) as c:
        yield c


# ---- seeding ---------------------------------------------------------------------------------

def ensure_line(engine: Any, name: str = "default") -> None:
    from service.lines import put_line

    with engine.begin() as conn:
        put_line(conn, name, "toy-base-model")


def seed_job(engine: Any, *, status: str = "running", step: int = 0,
             total_steps: int | None = 100, error: str | None = None, line: str = "default",
             started_at: datetime | None = None, finished_at: datetime | None = None,
             cancel_requested: bool = False) -> int:
    """A training_jobs row as a worker would have left it."""
    from service.models import training_jobs

    ensure_line(engine, line)
    now = datetime.now(UTC)
    values = dict(
        line=line, status=status, trigger="api", requested_by=None,
        params={"beta": 0.1, "learning_rate": 5e-6, "max_steps": total_steps, "lora": False},
        filters={"since": None, "until": None, "model_version": None, "source": None,
                 "corrections": False, "new_data_only": False},
        min_event_id=0, max_event_id=20, n_desirable=13, n_undesirable=8, n_users=4,
        lambda_d=1.0, lambda_u=1.625,
        data={"holdout_fraction": 0.05, "max_events_per_user": 500, "n_capped": 0,
              "target_ratio": 1.0, "lambda_source": "balancer"},
        reference_snapshot_id=None, step=step, total_steps=total_steps,
        attempt=1 if status != "queued" else 0, max_attempts=3,
        attempt_token="t" if status == "running" else None,
        cancel_requested=cancel_requested,
        worker_host="gpu-1" if status != "queued" else None,
        heartbeat_at=now if status == "running" else None, error=error,
        created_at=now, started_at=started_at or (now if status != "queued" else None),
        finished_at=finished_at,
    )
    with engine.begin() as conn:
        return int(conn.execute(insert(training_jobs).values(**values)
                                .returning(training_jobs.c.id)).scalar_one())


def metric_row(step: int) -> dict[str, Any]:
    """Deterministic curves: loss falls, margins grow."""
    return {"step": step, "loss": round(0.7 - 0.004 * step, 6), "kl": round(0.01 * step, 6),
            "rewards/chosen": round(0.02 * step, 6), "rewards/rejected": round(-0.01 * step, 6),
            "rewards/margins": round(0.03 * step, 6), "tokens_per_s": 1000.0 + step,
            "grad_norm": 1.5, "lr": 5e-6}


def seed_metrics(engine: Any, job_id: int, steps: range) -> list[dict[str, Any]]:
    from service.models import job_metrics

    rows = [metric_row(s) for s in steps]
    with engine.begin() as conn:
        conn.execute(insert(job_metrics), [
            {"job_id": job_id, "step": r["step"], "attempt": 1, "metrics": r,
             "created_at": datetime.now(UTC)} for r in rows])
    return rows


def seed_checkpoint(engine: Any, *, stage: str, line: str = "default",
                    percent: float | None = None, job_id: int | None = None,
                    metrics: dict[str, Any] | None = None,
                    changed_at: datetime | None = None) -> tuple[int, str]:
    """A registered checkpoint row as the gate would leave it; (id, model_version)."""
    now = changed_at or datetime.now(UTC) - timedelta(hours=1)
    if job_id is None:
        job_id = seed_job(engine, status="succeeded", line=line, finished_at=now)
    with engine.begin() as conn:
        params = {"line": line, "job": job_id, "stage": stage, "pct": percent,
                  "metrics": orjson.dumps(metrics or {"margin": 0.42, "kl": 0.8,
                                                      "checks": {"length_drift": 0.05}}).decode(),
                  "now": now.replace(tzinfo=None) if conn.dialect.name == "sqlite" else now}
        cid = conn.execute(text(
            "INSERT INTO checkpoints (line, model_version, job_id, base_model, artifact_path, "
            "format, stage, canary_percent, metrics, gate_attempts, created_at, "
            "stage_changed_at) VALUES (:line, :tmp, :job, 'toy-base-model', '/tmp/ckpt', "
            "'full', :stage, :pct, :metrics, 1, :now, :now) RETURNING id"),
            {**params, "tmp": f"tmp-{job_id}"}).scalar_one()
        version = f"{line}-ckpt-{cid}"
        conn.execute(text("UPDATE checkpoints SET model_version = :v WHERE id = :id"),
                     {"v": version, "id": cid})
    return int(cid), version


# ---- a real server and a real browser --------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc = proc
        self.url = url
        self.log = log

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def start_server(env_vars: dict[str, str], log: Path, timeout: float = 30.0) -> LiveServer:
    """uvicorn on a free port, in its own process, exactly as a deployment would run it."""
    port = free_port()
    fh = log.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
        cwd=ROOT, env={**os.environ, **env_vars}, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode}:\n"
                               + log.read_text(errors="replace")[-4000:])
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return LiveServer(proc, url, log)
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("uvicorn did not answer /healthz in time:\n"
                       + log.read_text(errors="replace")[-4000:])


def stop_server(server: LiveServer) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's chromium, headless, no downloads. Fails loudly (never skips) when it
    cannot start: `.ci/run` installs it with apt-get."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # pragma: no cover - environment problem
        pytest.fail(f"playwright is not installed ({exc}); `pip install -e '.[test]'`")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` "
                    "(.ci/run does this when it is absent)")
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    except Exception as exc:  # noqa: BLE001 - report why, with the path used
        pw.stop()
        pytest.fail(f"chromium at {CHROMIUM} could not start: {exc}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield b
    b.close()
    pw.stop()
