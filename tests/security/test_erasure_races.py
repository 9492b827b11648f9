"""A user erasure against ingestion in flight: each ingestion of the user's events is ordered
wholly before the erasure's transactions (deleted, id kept) or wholly after (a retry of an
erased id is a duplicate, a new event is new data), never in between.

The interleavings are made deterministic on the real databases: an ingest transaction is held
open by a second connection's uncommitted row with one of its event ids, an erasure by
pausing its thread right after a chosen statement (SQLAlchemy's cursor events), and the test
waits until Postgres reports the other side waiting on a lock before letting go.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy import event as sa_event

from service import erasure, user_locks
from service.ingest import event_id_hash, hash_user_id, ingest_items
from service.models import erased_event_ids, erasures, feedback_events
from tests.conftest import Env, make_env
from tests.security.conftest import sandboxed, wipe
from tests.service.helpers import event


@pytest.fixture
def pg_rights(tmp_path: Path, sec_pg_url: str) -> Iterator[Env]:
    env = make_env("postgres", sec_pg_url, **sandboxed(tmp_path))
    wipe(env)
    yield env
    env.app.state.engine.dispose()


def ingest(env: Env, items: list[dict[str, Any]]) -> list[str]:
    outs = ingest_items(items, env.app.state.models["FeedbackIn"], env.settings,
                        env.app.state.engine)
    return [o.status for o in outs]


def stored(env: Env, user: str) -> set[str]:
    h = hash_user_id(user, env.settings.user_id_key)
    with env.app.state.engine.connect() as conn:
        return set(conn.execute(select(feedback_events.c.event_id)
                                .where(feedback_events.c.user_hash == h)).scalars())


def kept(env: Env) -> set[str]:
    with env.app.state.engine.connect() as conn:
        return set(conn.execute(select(erased_event_ids.c.event_id_hash)).scalars())


class Run(threading.Thread):
    """A thread that keeps its function's result (or exception)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # re-raised by value()
            self.error = exc

    def value(self) -> Any:
        self.join(30)
        assert not self.is_alive(), "thread did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def erase(env: Env, user: str) -> Run:
    h = hash_user_id(user, env.settings.user_id_key)
    return Run(lambda: erasure.erase_user(env.app.state.engine, env.settings, h, actor="t"))


def lock_waits(env: Env, n: int, threads: list[Run]) -> None:
    """Until ``n`` sessions of this database wait on a lock, or every thread has ended."""
    deadline = time.monotonic() + 15
    with psycopg.connect(env.url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'").fetchone()[0]
            if waiting >= n or not any(t.is_alive() for t in threads):
                return
            time.sleep(0.02)
    raise AssertionError(f"fewer than {n} sessions waiting on a lock")


@contextmanager
def paused_after(engine: Engine, matches: Callable[[str, Any], bool]
                 ) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Hold the first thread that runs a statement ``matches(statement, params)`` picks right
    after it ran, inside its transaction, until ``go`` is set (at the latest on leaving)."""
    reached, go, once = threading.Event(), threading.Event(), threading.Lock()

    def hook(_conn: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        if matches(statement, params) and once.acquire(blocking=False):
            reached.set()
            go.wait(30)

    sa_event.listen(engine, "after_cursor_execute", hook)
    try:
        yield reached, go
    finally:
        go.set()
        sa_event.remove(engine, "after_cursor_execute", hook)


def _deleting(statement: str, _params: Any) -> bool:
    return statement.startswith("DELETE FROM feedback_events")


def _completing(statement: str, params: Any) -> bool:
    return (statement.startswith("UPDATE erasures SET completed_at")
            and isinstance(params, dict) and params.get("completed_at") is not None)


def test_an_erasure_waits_for_an_ingest_in_flight_and_deletes_its_event(pg_rights):
    """The ingest transaction holds the user's lock and has inserted, not committed: the
    erasure waits for it, then deletes the event and keeps its id. (Without the locks the
    erasure's reads miss the uncommitted row and it completes, then the event commits and
    stays, although it was sent before the erasure finished.)"""
    env = pg_rights
    assert ingest(env, [event(event_id="a-0", user_id="alice")]) == ["accepted"]
    with psycopg.connect(env.url) as blocker:  # holds the batch's INSERT on its last id
        blocker.execute(
            "INSERT INTO feedback_events (event_id, payload_hash, prompt, completion, desirable,"
            " model_version, occurred_at, received_at) VALUES"
            " ('zz-blocker', 'x', '\"p\"', 'c', true, 'm', now(), now())")
        batch = Run(lambda: ingest(env, [event(event_id="a-1", user_id="alice"),
                                         event(event_id="zz-blocker", user_id=None)]))
        lock_waits(env, 1, [batch])  # a-1 inserted, waiting on zz-blocker
        eraser = erase(env, "alice")
        lock_waits(env, 2, [eraser])
        erased_early = not eraser.is_alive()
        blocker.rollback()
    assert batch.value() == ["accepted", "accepted"]
    result = eraser.value()
    assert stored(env, "alice") == set() and result.n_events == 2
    assert kept(env) == {event_id_hash("a-0"), event_id_hash("a-1")}
    assert not erased_early


@pytest.mark.parametrize("many_users", [False, True], ids=["user-lock", "bulk-lock"])
def test_a_retry_racing_the_deleting_transaction_waits_and_is_a_duplicate(pg_rights, many_users):
    """The erasure has deleted the event and written its id in a transaction not yet
    committed: a retry of the event waits for it, then is answered as a duplicate and nothing
    is stored; an ingest of another user does not wait. A batch of more users than
    MAX_USER_LOCKS waits on the bulk lock instead. (Without the locks the retry's INSERT
    waits on the deleted row's index entry and then stores the event again, 'accepted'.)"""
    env = pg_rights
    alice = [event(event_id=f"r-{i}", user_id="alice") for i in range(2)]
    assert ingest(env, alice) == ["accepted"] * 2
    others = ([event(user_id=f"user-{i}") for i in range(user_locks.MAX_USER_LOCKS)]
              if many_users else [])
    with paused_after(env.app.state.engine, _deleting) as (reached, go):
        eraser = erase(env, "alice")
        assert reached.wait(15)
        retry = Run(lambda: ingest(env, [alice[0], *others]))
        lock_waits(env, 1, [retry])
        bob = Run(lambda: ingest(env, [event(user_id="bob")]))
        assert bob.value() == ["accepted"]  # while the erasure's transaction is open
        retried_early = not retry.is_alive()
        go.set()
        statuses = retry.value()
        result = eraser.value()
    assert statuses == ["duplicate"] + ["accepted"] * len(others)
    assert not retried_early
    assert result.n_events == 2 and stored(env, "alice") == set()
    assert kept(env) == {event_id_hash(e["event_id"]) for e in alice}


def test_an_event_sent_during_the_last_transaction_lands_after_it(pg_rights):
    """The erasure's last transaction (none of the user's events left, completed_at being
    set) holds the lock: a new event of the user waits and is stored after the erasure
    completed, as new data; a retry of an erased event waits and is a duplicate. (Without the
    locks the new event commits while the erasure completes, stored although it reached the
    database before the erasure was done.)"""
    env = pg_rights
    old = event(event_id="l-0", user_id="alice")
    assert ingest(env, [old]) == ["accepted"]
    new = event(event_id="l-new", user_id="alice")
    with paused_after(env.app.state.engine, _completing) as (reached, go):
        eraser = erase(env, "alice")
        assert reached.wait(15)
        fresh = Run(lambda: ingest(env, [new]))
        retry = Run(lambda: ingest(env, [old]))
        lock_waits(env, 2, [fresh, retry])
        answered_early = [t for t in (fresh, retry) if not t.is_alive()]
        go.set()
        result = eraser.value()
        assert fresh.value() == ["accepted"] and retry.value() == ["duplicate"]
    assert not answered_early
    assert result.n_events == 1
    assert stored(env, "alice") == {"l-new"}
    assert kept(env) == {event_id_hash("l-0")}


@pytest.mark.parametrize("behind_cursor", [False, True])
def test_an_event_stored_between_chunks_is_erased_whatever_its_id(rights_env, behind_cursor):
    """An event of the user committed between two of the erasure's transactions is deleted
    by the next one. Ids only grow on both backends (SQLite: AUTOINCREMENT since migration
    0009), so the new row lies ahead of the erasure's cursor; should one ever lie behind it
    (``behind_cursor``: given an id the erasure already deleted, as SQLite did before 0009),
    the last transaction looks again without the cursor."""
    env = rights_env
    engine = env.app.state.engine
    assert ingest(env, [event(event_id="c-bob", user_id="bob")]) == ["accepted"]
    assert ingest(env, [event(event_id=f"c-{i}", user_id="alice") for i in range(2)]) == [
        "accepted"] * 2
    with engine.connect() as conn:
        top = conn.execute(select(feedback_events.c.id).order_by(feedback_events.c.id.desc())
                           .limit(1)).scalar_one()
    eraser_thread: list[int] = []
    begins: list[int] = []
    new_id: list[int] = []

    def between(_conn: Any) -> None:
        if threading.get_ident() in eraser_thread:
            begins.append(1)
            if len(begins) == 3:  # the erasure row, the first chunk: committed; next not begun
                assert ingest(env, [event(event_id="c-new", user_id="alice")]) == ["accepted"]
                with engine.begin() as conn:
                    new = feedback_events.c.event_id == "c-new"
                    fresh = conn.execute(select(feedback_events.c.id).where(new)).scalar_one()
                    assert fresh > top  # never an id the erasure has passed
                    if behind_cursor:
                        conn.execute(update(feedback_events).where(new).values(id=top))
                    new_id.append(conn.execute(select(feedback_events.c.id).where(new)).scalar_one())

    sa_event.listen(engine, "begin", between)
    try:
        h = hash_user_id("alice", env.settings.user_id_key)

        def run() -> Any:
            eraser_thread.append(threading.get_ident())
            return erasure.erase_user(engine, env.settings, h, actor="t")

        result = Run(run).value()
    finally:
        sa_event.remove(engine, "begin", between)
    assert len(begins) >= 4 and new_id
    assert result.n_events == 3 and stored(env, "alice") == set()
    assert stored(env, "bob") == {"c-bob"}
    with engine.connect() as conn:
        row = conn.execute(select(erasures.c.min_event_id, erasures.c.max_event_id)
                           .where(erasures.c.id == result.erasure_id)).one()
    assert row.max_event_id == max(top, new_id[0])  # an id behind the cursor does not lower it


def test_sqlite_a_retry_does_not_slip_between_the_erased_check_and_the_insert(sec_env):
    """SQLite: the erasure commits just before the retry's INSERT. The erased ids are read
    after the INSERT, in its write transaction, so the retry is a duplicate and nothing is
    stored. (Read before it, outside the write transaction, the INSERT stored the erased
    event again.)"""
    env = sec_env
    engine = env.app.state.engine
    e1 = event(event_id="s-1", user_id="alice")
    assert ingest(env, [e1]) == ["accepted"]
    me = threading.get_ident()
    ran: list[Any] = []

    def before(_conn: Any, _cur: Any, statement: str, *_: Any) -> None:
        if (threading.get_ident() == me and not ran
                and statement.startswith("INSERT INTO feedback_events")):
            ran.append(erase(env, "alice").value())

    sa_event.listen(engine, "before_cursor_execute", before)
    try:
        assert ingest(env, [e1]) == ["duplicate"]
    finally:
        sa_event.remove(engine, "before_cursor_execute", before)
    assert ran and ran[0].n_events == 1
    assert stored(env, "alice") == set()
    assert kept(env) == {event_id_hash("s-1")}


def test_lock_keys():
    """Stable across processes and releases (a rolling deploy mixes both), user keys sorted,
    anonymous events take none, many users one bulk key; an erasure takes the bulk key and
    then its user's."""
    a, b = "a" * 64, "b" * 64
    assert user_locks.user_key(a) == user_locks.user_key("a" * 64)
    assert user_locks.user_key(a) == 5024751548649424016
    assert -(2 ** 63) <= user_locks.user_key(b) < 2 ** 63
    assert user_locks.ingest_keys([b, None, a, a, ""]) == sorted(
        [user_locks.user_key(a), user_locks.user_key(b)])
    assert user_locks.ingest_keys([None, None]) == []
    many = [f"{i:064x}" for i in range(user_locks.MAX_USER_LOCKS + 1)]
    assert user_locks.ingest_keys(many) == [user_locks.BULK_KEY]
    assert len(user_locks.ingest_keys(many[:-1])) == user_locks.MAX_USER_LOCKS
    assert user_locks.erasure_keys(a) == [user_locks.BULK_KEY, user_locks.user_key(a)]
