"""A database outage answers 503 with Retry-After, quickly: never a 500, never a hang."""

from __future__ import annotations

import secrets
import socket
import time

import psycopg
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.service.helpers import event


def _unreachable_settings(url: str) -> Settings:
    return Settings(database_url=url, db_connect_timeout_s=2, db_pool_timeout_s=1,
                    retry_after_s=7)


def test_healthz_and_readyz(pg_env, pg_client):
    assert pg_client.get("/healthz").json() == {"status": "ok"}
    assert pg_client.get("/readyz").status_code == 200


def test_refused_connection_is_503_with_retry_after():
    app = create_app(_unreachable_settings("postgresql://postgres@127.0.0.1:1/none"))
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.headers["retry-after"] == "7"
        r = c.post("/v1/feedback", json=event(), headers={"Authorization": "Bearer prospect_x"})
        assert r.status_code == 503 and r.json()["error"] == "database_unavailable"


def test_silent_server_times_out_into_503():
    """A host that accepts TCP but never answers: the connect timeout bounds the wait."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        port = srv.getsockname()[1]
        app = create_app(_unreachable_settings(f"postgresql://postgres@127.0.0.1:{port}/x"))
        with TestClient(app, raise_server_exceptions=False) as c:
            t0 = time.monotonic()
            r = c.get("/readyz")
            assert r.status_code == 503 and "retry-after" in r.headers
            assert time.monotonic() - t0 < 10


def test_killed_connections_recover(pg_env):
    """Server-side termination of the pool's connections: no 500, and service resumes."""
    name = f"prospect-kill-{secrets.token_hex(4)}"
    app = create_app(pg_env.make_settings(db_application_name=name))
    h = pg_env.headers()
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.post("/v1/feedback", json=event(), headers=h).status_code == 201
        with psycopg.connect(pg_env.url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s", (name,)).fetchone()[0]
        assert killed >= 1
        codes = [c.post("/v1/feedback", json=event(), headers=h).status_code for _ in range(3)]
    assert all(code in (201, 503) for code in codes) and codes[-1] == 201, codes


def test_locked_table_hits_statement_timeout_as_503(pg_env):
    """A statement stuck behind a lock is cancelled by statement_timeout: 503, not a hang."""
    app = create_app(pg_env.make_settings(db_statement_timeout_ms=300, key_cache_ttl_s=60))
    with TestClient(app, raise_server_exceptions=False) as c:
        h = pg_env.headers("ingest")
        assert c.post("/v1/feedback", json=event(), headers=h).status_code == 201  # key cached
        with psycopg.connect(pg_env.url) as locker:
            locker.execute("LOCK TABLE feedback_events IN ACCESS EXCLUSIVE MODE")
            t0 = time.monotonic()
            r = c.post("/v1/feedback", json=event(), headers=h)
            assert r.status_code == 503 and r.headers["retry-after"]
            assert time.monotonic() - t0 < 5
        assert c.post("/v1/feedback", json=event(), headers=h).status_code == 201


def test_sqlite_write_lock_is_503_after_busy_timeout(sqlite_url):
    import sqlite3

    from tests.conftest import make_env

    env = make_env("sqlite", sqlite_url, sqlite_busy_timeout_ms=200)
    path = sqlite_url.removeprefix("sqlite:///")
    with TestClient(env.app, raise_server_exceptions=False) as c:
        h = env.headers("ingest")
        assert c.post("/v1/feedback", json=event(), headers=h).status_code == 201
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            r = c.post("/v1/feedback", json=event(), headers=h)
            assert r.status_code == 503 and r.headers["retry-after"]
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert c.post("/v1/feedback", json=event(), headers=h).status_code == 201
