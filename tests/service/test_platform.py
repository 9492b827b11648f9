"""OpenAPI completeness, the no-torch rule, migrations on both backends, the demo."""

from __future__ import annotations

import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import inspect

from service import migrate
from service.app import create_app
from service.db import make_engine
from service.models import Base
from service.settings import Settings

EXPECTED = {
    ("/v1/feedback", "post"): {"200", "201", "400", "401", "403", "409", "413", "422", "503"},
    ("/v1/feedback/batch", "post"): {"207", "400", "401", "403", "413", "422", "503"},
    ("/v1/feedback/import-pairs", "post"): {"207", "400", "401", "403", "413", "422", "503"},
    ("/v1/feedback", "get"): {"200", "401", "403", "422", "503"},
    ("/v1/feedback/export", "get"): {"200", "401", "403", "422", "503"},
    ("/v1/balance", "get"): {"200", "401", "403", "422", "503"},
    ("/v1/balance/daily", "get"): {"200", "401", "403", "422", "503"},
    ("/healthz", "get"): {"200"},
    ("/readyz", "get"): {"200", "503"},
}


def test_openapi_documents_every_status_code(sqlite_url):
    app = create_app(Settings(database_url=sqlite_url))
    with TestClient(app) as c:
        spec = c.get("/openapi.json").json()
        assert c.get("/docs").status_code == 200
    for (path, method), codes in EXPECTED.items():
        documented = set(spec["paths"][path][method]["responses"])
        assert codes <= documented, (path, method, codes - documented)
    body = spec["paths"]["/v1/feedback"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/FeedbackIn"}
    assert "event_id" in spec["components"]["schemas"]["FeedbackIn"]["required"]


def test_service_never_imports_torch():
    """Also with `prospect train` registered: the worker's CLI imports torch only when run."""
    code = ("import sys, service.app, service.cli, service.ingest, service.jobs, service.queue;"
            "assert 'train' in [c.name for c in service.cli.app.registered_commands];"
            "bad = [m for m in ('torch', 'transformers', 'accelerate', 'peft') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_migrations_up_down_up_on_sqlite(tmp_path):
    s = Settings(database_url=f"sqlite:///{tmp_path / 'm.db'}")
    migrate.upgrade(s)
    migrate.downgrade(s, "base")
    engine = make_engine(s)
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    migrate.upgrade(s)
    assert {"feedback_events", "api_keys"} <= set(inspect(make_engine(s)).get_table_names())


def test_models_match_migrations(pg_url, sqlite_url):
    for url in (pg_url, sqlite_url):
        engine = make_engine(Settings(database_url=url))
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        engine.dispose()
        assert diff == [], (url.split(":")[0], diff)


def _downgrade_keeps_rows(url: str) -> None:
    """Downgrade 0010 to 0005 with a line, a job, its metrics, a checkpoint and a π_ref in
    the database: every row stays. SQLite's batch mode copies a table and drops the original,
    and with foreign keys on that DROP deleted the job's metrics (ON DELETE CASCADE) or failed
    on its checkpoint."""
    from sqlalchemy import text

    s = Settings(database_url=url)
    migrate.upgrade(s)
    engine = make_engine(s)
    tables = ("model_lines", "reference_snapshots", "training_jobs", "job_metrics", "checkpoints")
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO model_lines (name, base_model, created_at, updated_at) "
                "VALUES ('l', 'm', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
            conn.execute(text(
                "INSERT INTO reference_snapshots (id, line, status, source, created_at) "
                "VALUES (1, 'l', 'ready', 'm', CURRENT_TIMESTAMP)"))
            conn.execute(text(
                "INSERT INTO training_jobs (id, line, status, \"trigger\", params, filters, "
                "min_event_id, max_event_id, n_desirable, n_undesirable, n_users, lambda_d, "
                "lambda_u, data, reference_snapshot_id, max_attempts, created_at, retries) "
                "VALUES (1, 'l', 'failed', 'api', '{}', '{}', 0, 1, 1, 1, 1, 1.0, 1.0, '{}', 1, 3, "
                "CURRENT_TIMESTAMP, 1)"))
            conn.execute(text(
                "INSERT INTO job_metrics (job_id, step, attempt, metrics, created_at) "
                "VALUES (1, 1, 1, '{}', CURRENT_TIMESTAMP)"))
            conn.execute(text(
                "INSERT INTO checkpoints (line, model_version, job_id, reference_snapshot_id, "
                "base_model, format, stage, created_at, stage_changed_at) VALUES "
                "('l', 'l-ckpt-1', 1, 1, 'm', 'full', 'rejected', CURRENT_TIMESTAMP, "
                "CURRENT_TIMESTAMP)"))
        engine.dispose()
        for rev in ("0009", "0008", "0007", "0006", "0005"):
            migrate.downgrade(s, rev)
            with engine.connect() as conn:
                counts = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()
                          for t in tables}
            engine.dispose()
            assert counts == dict.fromkeys(tables, 1), (rev, counts)
        with engine.connect() as conn:
            assert "retries" not in {c["name"] for c in inspect(conn).get_columns("training_jobs")}
            assert "feedback" not in {c["name"] for c in inspect(conn).get_columns("model_lines")}
            assert "claim_token" not in {c["name"] for c in inspect(conn).get_columns("reference_snapshots")}
        engine.dispose()
        migrate.upgrade(s)
    finally:
        engine.dispose()


def test_downgrades_to_0005_keep_every_row_on_sqlite(tmp_path):
    _downgrade_keeps_rows(f"sqlite:///{tmp_path / 'down.db'}")


def test_downgrades_to_0005_keep_every_row_on_postgres():
    from tests.conftest import migrated_pg_database

    fresh = migrated_pg_database("prospect_down")
    try:
        _downgrade_keeps_rows(next(fresh))
    finally:
        next(fresh, None)  # drops the database
