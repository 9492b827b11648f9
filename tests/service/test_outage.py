"""A database outage answers 503 with Retry-After, quickly: never a 500, never a hang."""

from __future__ import annotations

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


def test_killed_connections_recover(pg_env, pg_client):
    """Server-side termination of the pool's connections: no 500, and service resumes."""
    h = pg_env.headers()
    assert pg_client.post("/v1/feedback", json=event(), headers=h).status_code == 201
    dbname = pg_env.url.rsplit("/", 1)[1]
    with psycopg.connect(pg_env.url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))
    codes = [pg_client.post("/v1/feedback", json=event(), headers=h).status_code
             for _ in range(3)]
    assert all(code in (201, 503) for code in codes) and codes[-1] == 201
