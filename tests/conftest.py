"""Shared fixtures: real databases, no mocks.

Postgres: one fresh database per test session (``prospect_test_<hex>``), created through the
``postgres`` database, migrated with Alembic, dropped at the end. SQLite: a file in a temp dir,
migrated the same way. ``backend`` runs a test on both. Fixtures are lazy: a session that runs
no service test never touches either database.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

PG_ADMIN_URL = os.environ.get(
    "PROSPECT_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _with_dbname(url: str, name: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + name


def migrated_pg_database(prefix: str) -> Iterator[str]:
    """A fresh database ``<prefix>_<hex>`` made through the ``postgres`` database, migrated
    with Alembic, dropped when the generator is closed (use it inside a fixture)."""
    import psycopg

    from service import migrate
    from service.settings import Settings

    name = f"{prefix}_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:  # pragma: no cover - environment problem
        pytest.fail(f"Postgres is required for these tests ({PG_ADMIN_URL}): {exc}. "
                    "`.ci/run` starts it.")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_dbname(PG_ADMIN_URL, name)
    migrate.upgrade(Settings(database_url=url))
    yield url
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A migrated, throw-away Postgres database for this test session."""
    yield from migrated_pg_database("prospect_test")


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    from service import migrate
    from service.settings import Settings

    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'prospect.db'}"
    migrate.upgrade(Settings(database_url=url))
    return url


@dataclass
class Env:
    """A migrated database, an app on it, and one key per scope."""

    backend: str
    url: str
    settings: Any
    app: Any
    keys: dict[str, str]

    def headers(self, scope: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[scope]}"}

    def clear(self) -> None:
        from sqlalchemy import delete

        from service.models import feedback_events

        with self.app.state.engine.begin() as conn:
            conn.execute(delete(feedback_events))

    def make_settings(self, **overrides: Any) -> Any:
        return self.settings.model_copy(update=overrides)


def make_env(backend: str, url: str, **overrides: Any) -> Env:
    from service.app import create_app
    from service.auth import create_key
    from service.db import make_sessionmaker
    from service.settings import Settings

    settings = Settings(database_url=url, user_id_key="test-user-id-key-0123456789",
                        **overrides)
    app = create_app(settings)
    keys = {}
    with make_sessionmaker(app.state.engine).begin() as session:
        for scope in ("ingest", "read", "admin"):
            keys[scope] = create_key(session, scope, name=f"test-{scope}")[1]
    return Env(backend, url, settings, app, keys)


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def env(request: pytest.FixtureRequest) -> Env:
    """The core ingestion tests run once per backend."""
    url = request.getfixturevalue("pg_url" if request.param == "postgres" else "sqlite_url")
    return make_env(request.param, url)


@pytest.fixture(scope="session")
def pg_env(pg_url: str) -> Env:
    return make_env("postgres", pg_url)


@pytest.fixture
def client(env: Env) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    env.clear()
    with TestClient(env.app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def pg_client(pg_env: Env) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    pg_env.clear()
    with TestClient(pg_env.app, raise_server_exceptions=False) as c:
        yield c
