"""API keys: 401 for missing/unknown/revoked/expired, 403 for the wrong scope, CLI."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from service.app import create_app
from service.auth import KEY_PREFIX, create_key, revoke_key
from service.cli import app as cli
from service.db import make_sessionmaker
from service.models import ApiKey
from tests.service.helpers import event


def test_missing_and_unknown_keys_are_401(env, client):
    r = client.post("/v1/feedback", json=event())
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["errors"][0]["field"] == "Authorization"
    r = client.post("/v1/feedback", json=event(), headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    r = client.get("/v1/balance", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401


def test_scopes(env, client):
    ingest, read, admin = (env.headers(s) for s in ("ingest", "read", "admin"))
    assert client.post("/v1/feedback", json=event(), headers=read).status_code == 403
    assert client.post("/v1/feedback/batch", json=[event()], headers=read).status_code == 403
    assert client.post("/v1/feedback/import-pairs", json=[], headers=read).status_code == 403
    for path in ("/v1/feedback", "/v1/feedback/export", "/v1/balance", "/v1/balance/daily"):
        assert client.get(path, headers=ingest).status_code == 403, path
        assert client.get(path, headers=read).status_code == 200, path
        assert client.get(path, headers=admin).status_code == 200, path
    assert client.post("/v1/feedback", json=event(), headers=ingest).status_code == 201
    assert client.post("/v1/feedback", json=event(), headers=admin).status_code == 201
    # X-API-Key works as well as the Bearer header.
    assert client.post("/v1/feedback", json=event(),
                       headers={"X-API-Key": env.keys["ingest"]}).status_code == 201


def test_keys_are_stored_as_sha256_digests(env):
    with make_sessionmaker(env.app.state.engine)() as s:
        rows = s.scalars(select(ApiKey)).all()
    secret = env.keys["ingest"]
    assert secret.startswith(KEY_PREFIX) and len(secret) > 40
    digests = {r.digest for r in rows}
    assert hashlib.sha256(secret.encode()).hexdigest() in digests
    assert all(secret not in (r.digest, r.display_prefix, r.name or "") for r in rows)


def _new_key(app, scopes="ingest", **kw):
    with make_sessionmaker(app.state.engine).begin() as s:
        row, secret = create_key(s, scopes, **kw)
        return row.id, {"Authorization": f"Bearer {secret}"}


def test_revoked_key_is_401_within_the_cache_ttl(env):
    app = create_app(env.make_settings(key_cache_ttl_s=0.3))
    with TestClient(app) as c:
        key_id, h = _new_key(app)
        assert c.post("/v1/feedback", json=event(), headers=h).status_code == 201
        with make_sessionmaker(app.state.engine).begin() as s:
            assert revoke_key(s, key_id)
        time.sleep(0.35)
        assert c.post("/v1/feedback", json=event(), headers=h).status_code == 401


def test_expired_key_is_401_even_when_cached(env):
    app = create_app(env.make_settings(key_cache_ttl_s=60))
    with TestClient(app) as c:
        _, past = _new_key(app, expires_at=datetime.now(UTC) - timedelta(seconds=1))
        assert c.post("/v1/feedback", json=event(), headers=past).status_code == 401
        _, soon = _new_key(app, expires_at=datetime.now(UTC) + timedelta(seconds=1))
        assert c.post("/v1/feedback", json=event(), headers=soon).status_code == 201
        time.sleep(1.1)
        r = c.post("/v1/feedback", json=event(), headers=soon)
        assert r.status_code == 401 and "expired" in r.json()["message"]


def test_cli_keys_create_list_revoke(sqlite_url, monkeypatch):
    monkeypatch.setenv("PROSPECT_DATABASE_URL", sqlite_url)
    runner = CliRunner()
    r = runner.invoke(cli, ["keys", "create", "--scope", "ingest", "--scope", "read",
                            "--name", "cli-test", "--expires", "30d"])
    assert r.exit_code == 0, r.output
    secret = r.stdout.strip().splitlines()[0]
    assert secret.startswith(KEY_PREFIX)
    listing = runner.invoke(cli, ["keys", "list"]).stdout
    line = next(x for x in listing.splitlines() if "cli-test" in x)
    assert "ingest,read" in line and "active" in line and secret not in listing
    key_id = line.split()[0]
    r = runner.invoke(cli, ["keys", "revoke", key_id])
    assert r.exit_code == 0
    line = next(x for x in runner.invoke(cli, ["keys", "list"]).stdout.splitlines()
                if "cli-test" in x)
    assert "revoked" in line
    assert runner.invoke(cli, ["keys", "revoke", key_id]).exit_code == 1
    assert runner.invoke(cli, ["keys", "create", "--scope", "root"]).exit_code != 0


@pytest.mark.parametrize("value,delta", [("30d", timedelta(days=30)), ("12h", timedelta(hours=12))])
def test_expiry_parsing(value, delta):
    from service.cli import parse_expiry

    now = datetime(2024, 1, 1, tzinfo=UTC)
    assert parse_expiry(value, now) == now + delta
    assert parse_expiry("2025-01-01T00:00:00", now) == datetime(2025, 1, 1, tzinfo=UTC)


def test_cli_db_upgrade_and_settings_from_env(tmp_path, monkeypatch):
    from sqlalchemy import inspect

    from service.db import make_engine
    from service.settings import Settings

    url = f"sqlite:///{tmp_path / 'sub' / 'cli.db'}"
    monkeypatch.setenv("PROSPECT_DATABASE_URL", url)
    monkeypatch.setenv("PROSPECT_MAX_BATCH_ITEMS", "7")
    s = Settings()
    assert s.database_url == url and s.max_batch_items == 7
    r = CliRunner().invoke(cli, ["db", "upgrade"])
    assert r.exit_code == 0, r.output
    assert {"feedback_events", "api_keys"} <= set(inspect(make_engine(s)).get_table_names())
