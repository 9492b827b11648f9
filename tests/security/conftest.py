"""Security and data-rights fixtures: private databases (a copy of one migrated SQLite file per
test, and one private Postgres database per session), so the jobs and checkpoints these tests
create never meet the shared ones, and settings that keep every side effect (broker, artifacts)
inside the test's temp folder.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Env, make_env, migrated_pg_database


@pytest.fixture(scope="session")
def sec_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite file; each test copies it (faster than migrating again)."""
    from service import migrate
    from service.settings import Settings

    path = tmp_path_factory.mktemp("sec-template") / "prospect.db"
    migrate.upgrade(Settings(database_url=f"sqlite:///{path}"))
    return path


def sandboxed(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """Settings overrides that keep the broker and artifacts in ``tmp_path``."""
    base = {"broker_url": f"sqla+sqlite:///{tmp_path / 'broker.db'}",
            "artifacts_root": str(tmp_path / "artifacts"), "log_format": "none"}
    return {**base, **overrides}


def sqlite_env(tmp_path: Path, template: Path, **overrides: Any) -> Env:
    tmp_path.mkdir(parents=True, exist_ok=True)
    db = tmp_path / "prospect.db"
    shutil.copyfile(template, db)
    return make_env("sqlite", f"sqlite:///{db}", **sandboxed(tmp_path, **overrides))


@pytest.fixture
def sec_env(tmp_path: Path, sec_template: Path) -> Iterator[Env]:
    """A fresh SQLite database and app with one key per scope."""
    env = sqlite_env(tmp_path, sec_template)
    yield env
    env.app.state.engine.dispose()


@pytest.fixture(scope="session")
def sec_pg_url() -> Iterator[str]:
    yield from migrated_pg_database("prospect_sec")


_WIPE = ("erased_event_ids", "erasure_jobs", "erasures", "checkpoints", "job_metrics", "training_jobs",
         "reference_snapshots", "feedback_events", "model_lines")


def wipe(env: Env) -> None:
    """Empty what these tests write (children first); keys stay."""
    with env.app.state.engine.begin() as conn:
        for name in _WIPE:
            conn.exec_driver_sql(f"DELETE FROM {name}")


@pytest.fixture(params=["sqlite", "postgres"])
def rights_env(request: pytest.FixtureRequest, tmp_path: Path, sec_template: Path
               ) -> Iterator[Env]:
    """Data-rights tests run on both backends (row locks and window functions differ)."""
    if request.param == "sqlite":
        env = sqlite_env(tmp_path, sec_template, base_model="toy-base")
    else:
        url = request.getfixturevalue("sec_pg_url")
        env = make_env("postgres", url, **sandboxed(tmp_path, base_model="toy-base"))
        wipe(env)
    yield env
    env.app.state.engine.dispose()
