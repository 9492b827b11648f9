"""A job's frozen range (min_event_id, max_event_id] never takes in an event that commits after
the job counted its data (Postgres: ids come from a sequence at INSERT time, rows become
visible at commit). Each test holds an ingest-like transaction open on a second connection,
so the interleaving is deterministic."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Connection, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from service import jobs
from service.job_schemas import JobFilters, JobParams
from service.models import feedback_events as fe
from service.models import training_jobs as tj
from service.selection import SPLIT_BUCKETS, count_selection, iter_selected, split_bucket
from tests.jobs.conftest import seed_feedback

#: A thread still inside create_job after this long is waiting (it otherwise takes ~10 ms).
WAITING_S = 0.5


def _train_event_id(prefix: str) -> str:
    """An event id in the train split (holdout 5%), so the job's class counts include it."""
    return next(f"{prefix}-{i}" for i in itertools.count()
                if split_bucket(f"{prefix}-{i}") >= SPLIT_BUCKETS // 10)


def _row(event_id: str, desirable: bool = False) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {"event_id": event_id, "payload_hash": "0" * 64, "prompt": "held prompt",
            "completion": "held answer", "desirable": desirable, "model_version": "base",
            "user_hash": "held-user", "occurred_at": now, "received_at": now,
            "split_bucket": split_bucket(event_id)}


def _insert(conn: Connection, *rows: dict[str, Any]) -> list[int]:
    """As ingestion inserts: ids from the column default, ON CONFLICT (event_id) DO NOTHING."""
    stmt = pg_insert(fe).values(list(rows)).on_conflict_do_nothing(index_elements=["event_id"])
    return list(conn.execute(stmt.returning(fe.c.id)).scalars())


@contextmanager
def _held(jenv) -> Iterator[Connection]:
    """A second connection whose transaction the test ends (rolled back if it does not)."""
    with jenv.app.state.engine.connect() as conn:
        try:
            yield conn
        finally:
            if conn.in_transaction():
                conn.rollback()


def _create(jenv, **filters: Any) -> dict[str, Any]:
    return jobs.create_job(jenv.app.state.engine, jenv.settings, line="default",
                           params=JobParams(), filters=JobFilters(**filters))


def _recount(jenv, job: dict[str, Any]) -> tuple[int, int]:
    with jenv.app.state.engine.connect() as conn:
        c = count_selection(conn, jobs.selection_for(job, jenv.settings))
    return c.n_desirable, c.n_undesirable


def _trained_ids(jenv, job: dict[str, Any]) -> set[int]:
    """What the trainer reads (worker/job_child.py: iter_selected(selection_for(job)))."""
    with jenv.app.state.engine.connect() as conn:
        return {r["id"] for r in iter_selected(conn, jobs.selection_for(job, jenv.settings))}


def _still_waiting(fut: Future) -> bool:
    time.sleep(WAITING_S)
    return not fut.done()


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_create_job_waits_for_an_insert_below_the_newest_id(jclient, jenv, outcome):
    seed_feedback(jclient, jenv, n=40)
    held_eid = _train_event_id("held")
    with _held(jenv) as held, ThreadPoolExecutor(1) as pool:
        [held_id] = _insert(held, _row(held_eid))  # not committed
        seed_feedback(jclient, jenv, n=10, prefix="late")  # committed, ids above held_id
        fut = pool.submit(_create, jenv)
        assert _still_waiting(fut), "create_job froze while an event below its max was in flight"
        getattr(held, outcome)()
        job = fut.result(timeout=10)
    assert job["max_event_id"] > held_id
    # The counts made at creation are what the trainer reads now: nothing joined later.
    assert (job["n_desirable"], job["n_undesirable"]) == _recount(jenv, job)
    assert (held_id in _trained_ids(jenv, job)) is (outcome == "commit")


def test_new_data_only_does_not_lose_an_event_committed_late(jclient, jenv):
    seed_feedback(jclient, jenv, n=40)
    held_eid = _train_event_id("lost")

    def create_and_read() -> tuple[dict[str, Any], set[int]]:
        job = _create(jenv)  # the trainer reads as soon as the job exists (worst case)
        return job, _trained_ids(jenv, job)

    with _held(jenv) as held, ThreadPoolExecutor(1) as pool:
        [held_id] = _insert(held, _row(held_eid))
        seed_feedback(jclient, jenv, n=10, prefix="late")
        fut = pool.submit(create_and_read)
        time.sleep(WAITING_S)
        held.commit()
        first, trained_first = fut.result(timeout=10)
    with jenv.app.state.engine.begin() as conn:
        conn.execute(update(tj).where(tj.c.id == first["id"]).values(status="succeeded"))
    seed_feedback(jclient, jenv, n=30, prefix="next")
    second = _create(jenv, new_data_only=True)
    assert second["min_event_id"] == first["max_event_id"]
    assert held_id in trained_first | _trained_ids(jenv, second), \
        "an event that committed after the first job froze is trained by neither job"


def test_an_id_taken_before_its_row_is_written_is_waited_for(jclient, jenv):
    """The id is handed out when the INSERT forms the row, before the transaction writes
    anything (and possibly before it has a transaction id): here it waits on another
    transaction inserting the same event_id, which then rolls back."""
    seed_feedback(jclient, jenv, n=40)
    eid = _train_event_id("race")
    with _held(jenv) as first, _held(jenv) as second, ThreadPoolExecutor(2) as pool:
        _insert(first, _row(eid))
        second_pid = second.execute(text("SELECT pg_backend_pid()")).scalar_one()
        blocked = pool.submit(_insert, second, _row(eid))  # waits for `first`: a duplicate?
        with jenv.app.state.engine.connect() as conn:
            for _ in range(100):
                if conn.execute(text("SELECT wait_event_type = 'Lock' FROM pg_stat_activity "
                                     "WHERE pid = :p"), {"p": second_pid}).scalar_one():
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the second INSERT never waited for the first")
        seed_feedback(jclient, jenv, n=10, prefix="late")
        fut = pool.submit(_create, jenv)
        assert _still_waiting(fut)
        first.rollback()  # `second` now stores the event under the id it took while waiting
        [held_id] = blocked.result(timeout=10)
        assert _still_waiting(fut), "create_job did not wait for the id taken while blocked"
        second.commit()
        job = fut.result(timeout=10)
    assert held_id <= job["max_event_id"]
    assert (job["n_desirable"], job["n_undesirable"]) == _recount(jenv, job)
    assert held_id in _trained_ids(jenv, job)


def test_a_transaction_that_outlives_the_wait_refuses_the_job(jclient, jenv):
    seed_feedback(jclient, jenv, n=40)
    app_settings = jenv.app.state.settings
    jenv.app.state.settings = app_settings.model_copy(update={"freeze_wait_s": 0.3})
    try:
        with _held(jenv) as held:
            _insert(held, _row(_train_event_id("stuck")))
            seed_feedback(jclient, jenv, n=10, prefix="late")
            t0 = time.monotonic()
            r = jclient.post("/v1/jobs", json={}, headers=jenv.headers("admin"))
            waited = time.monotonic() - t0
            decision = jobs.check_retraining(
                jenv.app.state.engine, jenv.app.state.settings.model_copy(
                    update={"retrain_min_events": 1}), "default")
    finally:
        jenv.app.state.settings = app_settings
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "ingestion_in_flight" and "PROSPECT_FREEZE_WAIT_S" in r.json()["message"]
    assert r.headers["retry-after"] == str(app_settings.retry_after_s)
    assert waited >= 0.3
    # The scheduled check skips this round with the reason instead of failing.
    assert decision.job_id is None and "PROSPECT_FREEZE_WAIT_S" in decision.reason
    with jenv.app.state.engine.connect() as conn:
        assert conn.execute(select(tj.c.id)).first() is None
    # Once the transaction has ended the same request succeeds.
    assert jclient.post("/v1/jobs", json={}, headers=jenv.headers("admin")).status_code == 202


def test_unrelated_writers_are_not_waited_for(jclient, jenv):
    """Only transactions that took a feedback id count: an open write elsewhere (here to a
    scratch table; a job heartbeat, an erasure, another database on the server) neither delays
    nor refuses the job."""
    app_settings = jenv.app.state.settings
    jenv.app.state.settings = app_settings.model_copy(update={"freeze_wait_s": 0.2})
    try:
        with _held(jenv) as other:
            other.execute(text("CREATE TEMP TABLE scratch (x int); INSERT INTO scratch VALUES (1)"))
            assert other.execute(text("SELECT pg_current_xact_id_if_assigned()")).scalar_one()
            seed_feedback(jclient, jenv, n=40)  # commits after it: it is in every snapshot's xip
            r = jclient.post("/v1/jobs", json={}, headers=jenv.headers("admin"))
    finally:
        jenv.app.state.settings = app_settings
    assert r.status_code == 202, r.text


def test_feedback_ids_come_from_a_sequence_without_cache(jenv):
    """The wait relies on ids being handed out in the order they are asked for: a sequence
    CACHE above 1 gives each session a block of ids, and an old block's id commits late."""
    with jenv.app.state.engine.connect() as conn:
        cache = conn.execute(text(
            "SELECT seqcache FROM pg_sequence WHERE seqrelid = "
            "CAST(pg_get_serial_sequence('feedback_events', 'id') AS regclass)")).scalar_one()
    assert cache == 1
