"""What the database itself guarantees: one production and one canary per line, an append-only
audit trail, and migrations that go up and down on both backends."""

from __future__ import annotations

import secrets
import threading
from collections import Counter

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from service import migrate, registry
from service.errors import ApiError
from service.models import checkpoints, rollout_events
from service.settings import Settings


@pytest.mark.parametrize("stage", ["production", "canary"])
def test_database_refuses_a_second_production_or_canary(reg, stage):
    a, b = reg.candidate(), reg.candidate()
    with reg.engine.begin() as conn:
        conn.execute(update(checkpoints).where(checkpoints.c.id == a["id"]).values(stage=stage))
    with pytest.raises(IntegrityError), reg.engine.begin() as conn:
        conn.execute(update(checkpoints).where(checkpoints.c.id == b["id"]).values(stage=stage))
    # another line may have its own
    other = reg.__class__(reg.env, reg.line, reg.base, reg.client)
    from tests.registry.conftest import new_line

    other.line = new_line(reg.env, reg.base)
    c = other.candidate()
    with reg.engine.begin() as conn:
        conn.execute(update(checkpoints).where(checkpoints.c.id == c["id"]).values(stage=stage))


def test_rollout_events_are_append_only(reg):
    reg.candidate()
    with pytest.raises(DBAPIError, match="append-only"), reg.engine.begin() as conn:
        conn.execute(update(rollout_events).where(rollout_events.c.line == reg.line)
                     .values(reason="rewritten"))
    with pytest.raises(DBAPIError, match="append-only"), reg.engine.begin() as conn:
        conn.execute(rollout_events.delete().where(rollout_events.c.line == reg.line))
    assert len(reg.events()) == 2


def test_concurrent_promotions_leave_one_production(reg):
    """Threads promote different candidates of one line at the same instant, round after
    round: exactly one production each time, the losers get 409, the audit agrees."""
    n, rounds = 6, 4
    for _ in range(rounds):
        cands = [reg.candidate() for _ in range(n)]
        barrier = threading.Barrier(n)
        outcomes: list[str] = []

        def go(cid: int) -> None:
            barrier.wait()
            try:
                registry.promote(reg.engine, reg.settings, cid, "production", None,
                                 registry.Actor.key(1))
                outcomes.append("ok")
            except ApiError as exc:
                outcomes.append(f"{exc.status}:{exc.error}")

        threads = [threading.Thread(target=go, args=(c["id"],)) for c in cands]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        counts = Counter(outcomes)
        assert counts["ok"] >= 1 and set(counts) <= {"ok", "409:production_conflict"}, counts
        with reg.engine.connect() as conn:
            prods = conn.execute(select(func.count()).where(
                checkpoints.c.line == reg.line, checkpoints.c.stage == "production")).scalar()
        assert prods == 1
    promotions = [e for e in reg.events() if e["action"] == "production"]
    retirements = [e for e in reg.events() if e["action"] == "retired"]
    assert len(retirements) == len(promotions) - 1
    with reg.engine.connect() as conn:
        retired = conn.execute(select(func.count()).where(
            checkpoints.c.line == reg.line, checkpoints.c.stage == "retired")).scalar()
    assert retired == len(retirements)


def test_concurrent_canary_starts_leave_one_canary(reg):
    cands = [reg.candidate() for _ in range(5)]
    barrier = threading.Barrier(len(cands))
    outcomes: list[str] = []

    def go(cid: int) -> None:
        barrier.wait()
        try:
            registry.promote(reg.engine, reg.settings, cid, "canary", 10.0, registry.Actor.key(1))
            outcomes.append("ok")
        except ApiError as exc:
            outcomes.append(exc.error)

    threads = [threading.Thread(target=go, args=(c["id"],)) for c in cands]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Counter(outcomes) == {"ok": 1, "canary_active": len(cands) - 1}, outcomes


def test_migrations_up_down_up_on_postgres(pg_url):
    import psycopg

    from tests.conftest import PG_ADMIN_URL, _with_dbname

    name = f"prospect_mig_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        s = Settings(database_url=_with_dbname(PG_ADMIN_URL, name))
        migrate.upgrade(s)
        migrate.downgrade(s, "0002")
        from service.db import make_engine

        engine = make_engine(s)
        with engine.connect() as conn:
            names = set(conn.execute(text(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars())
            fn = conn.execute(text("SELECT count(*) FROM pg_proc WHERE proname = "
                                   "'rollout_events_append_only'")).scalar()
        assert "checkpoints" not in names and "rollout_events" not in names and fn == 0
        migrate.upgrade(s)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM checkpoints")).scalar() == 0
        engine.dispose()
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migrations_down_to_0002_and_up_on_sqlite(tmp_path):
    from sqlalchemy import inspect

    from service.db import make_engine

    s = Settings(database_url=f"sqlite:///{tmp_path / 'm.db'}")
    migrate.upgrade(s)
    migrate.downgrade(s, "0002")
    assert "checkpoints" not in inspect(make_engine(s)).get_table_names()
    migrate.upgrade(s)
    assert {"checkpoints", "rollout_events", "notifications"} <= set(
        inspect(make_engine(s)).get_table_names())
