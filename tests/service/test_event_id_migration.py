"""Migration 0010 (feedback_events.id AUTOINCREMENT on SQLite) on a database that has data:
rows, indexes and the id counter survive upgrade, downgrade and upgrade again; Postgres is
untouched (its sequence never reuses ids)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.schema import CreateTable

from service import migrate
from service.db import make_engine
from service.models import Base, erasures, feedback_events, model_lines, training_jobs
from service.settings import Settings
from tests.conftest import migrated_pg_database

BEFORE = "0009"
NOW = datetime(2026, 1, 2, tzinfo=UTC)


def _event(i: int) -> dict[str, Any]:
    return {"event_id": f"mig-{i}", "payload_hash": "h" * 64, "prompt": [{"role": "user", "content": f"q{i}"}],
            "completion": f"a{i}", "desirable": i % 2 == 0, "model_version": "m", "user_hash": f"u{i % 3}",
            "replaces": f"mig-{i - 1}" if i % 4 == 0 else None, "occurred_at": NOW, "received_at": NOW,
            "split_bucket": i}


def _insert(url: str, n: int, start: int = 1, with_ids: bool = True) -> list[int]:
    engine = make_engine(Settings(database_url=url))
    rows = [{**_event(i), **({"id": i} if with_ids else {})} for i in range(start, start + n)]
    with engine.begin() as conn:
        ids = [conn.execute(insert(feedback_events).values(**r).returning(feedback_events.c.id)).scalar_one()
               for r in rows]
    engine.dispose()
    return ids


def _schema(path: Path) -> dict[str, Any]:
    """What must survive a rebuild: the rows, every index (PRAGMA index_list: name, unique,
    origin, partial, and its columns and SQL), the table's columns."""
    with sqlite3.connect(path) as c:
        indexes = {}
        for _seq, name, unique, origin, partial in c.execute("PRAGMA index_list(feedback_events)"):
            cols = [r[2] for r in c.execute(f"PRAGMA index_info({name})")]
            sql = c.execute("SELECT sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]
            indexes[name] = (unique, origin, partial, cols, sql)
        return {"indexes": indexes,
                "columns": c.execute("PRAGMA table_info(feedback_events)").fetchall(),
                "rows": c.execute("SELECT * FROM feedback_events ORDER BY id").fetchall()}


def _autoincrement(path: Path) -> tuple[bool, int]:
    """Whether the table is AUTOINCREMENT, and the largest id it remembers (0: none)."""
    with sqlite3.connect(path) as c:
        sql = c.execute("SELECT sql FROM sqlite_master WHERE name = 'feedback_events'").fetchone()[0]
        seq = [r[0] for r in c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'feedback_events'")] \
            if c.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").fetchone() else []
        assert len(seq) <= 1, seq
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert c.execute("PRAGMA foreign_key_check").fetchall() == []
    return "AUTOINCREMENT" in sql.upper(), seq[0] if seq else 0


def test_upgrade_keeps_rows_and_indexes_and_continues_after_every_id_used(tmp_path):
    path = tmp_path / "m.db"
    url = f"sqlite:///{path}"
    s = Settings(database_url=url)
    migrate.upgrade(s, BEFORE)
    _insert(url, 12)
    engine = make_engine(s)
    with engine.begin() as conn:
        # 11 and 12 went with an erasure that recorded them; 10 left no trace at all.
        conn.execute(feedback_events.delete().where(feedback_events.c.id >= 10))
        conn.execute(insert(erasures).values(kind="user", n_events=2, min_event_id=11, max_event_id=12,
                                             actor="cli", created_at=NOW, completed_at=NOW))
    engine.dispose()
    before = _schema(path)
    assert len(before["rows"]) == 9 and len(before["indexes"]) == 5
    assert _autoincrement(path) == (False, 0)

    migrate.upgrade(s)
    assert _schema(path) == before
    assert _autoincrement(path) == (True, 12)
    [new] = _insert(url, 1, start=100, with_ids=False)
    assert new == 13

    migrate.downgrade(s, BEFORE)
    after_down = _schema(path)
    assert after_down["indexes"] == before["indexes"] and after_down["columns"] == before["columns"]
    assert [r[0] for r in after_down["rows"]] == [r[0] for r in before["rows"]] + [13]
    assert _autoincrement(path) == (False, 0)

    migrate.upgrade(s)
    assert _schema(path) == after_down
    assert _autoincrement(path) == (True, 13)
    with make_engine(s).begin() as conn:
        conn.execute(feedback_events.delete().where(feedback_events.c.id == 13))
    assert _insert(url, 1, start=200, with_ids=False) == [14]


@pytest.mark.parametrize("recorded_by", ["erasure", "job", None])
def test_upgrade_of_an_emptied_table_starts_after_the_largest_recorded_id(tmp_path, recorded_by):
    """Every event deleted before the migration: the counter starts after the largest id an
    erasure or a job recorded; with no record, ids start at 1 again (nothing is known)."""
    path = tmp_path / "e.db"
    url = f"sqlite:///{path}"
    s = Settings(database_url=url)
    migrate.upgrade(s, BEFORE)
    _insert(url, 5)
    engine = make_engine(s)
    with engine.begin() as conn:
        conn.execute(feedback_events.delete())
        if recorded_by == "erasure":
            conn.execute(insert(erasures).values(kind="retention", n_events=5, min_event_id=1, max_event_id=5,
                                                 actor="retention", created_at=NOW))
        elif recorded_by == "job":
            conn.execute(insert(model_lines).values(name="default", base_model="toy", created_at=NOW,
                                                    updated_at=NOW))
            conn.execute(insert(training_jobs).values(
                line="default", status="queued", trigger="api", params={}, filters={}, min_event_id=0,
                max_event_id=5, n_desirable=1, n_undesirable=1, n_users=2, lambda_d=1.0, lambda_u=1.0,
                data={}, max_attempts=3, created_at=NOW))
    engine.dispose()
    migrate.upgrade(s)
    expected = 5 if recorded_by else 0
    assert _autoincrement(path) == (True, expected)
    assert _insert(url, 1, start=300, with_ids=False) == [expected + 1]


def test_models_create_the_same_table_as_the_migrations(tmp_path):
    """A schema built from the models (create_all) also never reuses ids, with the same indexes."""
    assert "AUTOINCREMENT" in str(CreateTable(feedback_events).compile(dialect=sqlite.dialect()))
    migrated, created = tmp_path / "migrated.db", tmp_path / "created.db"
    migrate.upgrade(Settings(database_url=f"sqlite:///{migrated}"))
    engine = make_engine(Settings(database_url=f"sqlite:///{created}"))
    Base.metadata.create_all(engine)
    engine.dispose()
    assert _autoincrement(created) == _autoincrement(migrated) == (True, 0)
    assert _schema(created)["indexes"].keys() == _schema(migrated)["indexes"].keys()
    assert ({k: v[:4] for k, v in _schema(created)["indexes"].items()}
            == {k: v[:4] for k, v in _schema(migrated)["indexes"].items()})


def _pg_shape(url: str) -> dict[str, Any]:
    engine = make_engine(Settings(database_url=url))
    with engine.connect() as conn:
        shape = {
            "indexes": sorted(conn.execute(text(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'feedback_events'")).all()),
            "id": conn.execute(text(
                "SELECT data_type, column_default FROM information_schema.columns "
                "WHERE table_name = 'feedback_events' AND column_name = 'id'")).one(),
            "rows": conn.execute(select(feedback_events.c.id).order_by(feedback_events.c.id)).scalars().all(),
        }
    engine.dispose()
    return shape


def test_postgres_is_left_as_it_is():
    """A sequence never hands out an id twice: 0010 does nothing there, both ways."""
    gen = migrated_pg_database("prospect_mig")
    url = next(gen)
    try:
        s = Settings(database_url=url)
        ids = _insert(url, 4, with_ids=False)
        with make_engine(s).begin() as conn:
            conn.execute(feedback_events.delete().where(feedback_events.c.id == max(ids)))
        head = _pg_shape(url)
        migrate.downgrade(s, BEFORE)
        assert _pg_shape(url) == head
        migrate.upgrade(s)
        assert _pg_shape(url) == head
        assert _insert(url, 1, start=400, with_ids=False) == [max(ids) + 1]
    finally:
        next(gen, None)  # drops the database
