"""The newest feedback id a job may freeze: every event with an id at or below it is already
committed or aborted, so the frozen range ``(min_event_id, max_event_id]`` never takes in an
event that commits later.

Postgres hands ids out from the ``feedback_events`` sequence when the INSERT runs; the row
becomes visible only when its transaction commits (ingestion: milliseconds later). A plain
``max(id)`` can therefore sit above the id of an event still in flight; that event would then
be trained without being counted, or, with ``new_data_only``, trained by no job at all when the
next job starts above it.

The wait, exact and without blocking anyone: ``nextval`` takes a RowExclusiveLock on the
sequence *before* handing out the id and keeps it until the top transaction ends (committed
rows are visible to new snapshots by then). The sequence has CACHE 1, so ids come out in the
order they are asked for. One statement reads ``max(id)`` = M (committed, visible) and, after
its snapshot, which transactions hold that lock. Any transaction with an id <= M asked for it
before M's transaction committed, so it has either finished or is in that list; once all of
them have released the lock, every row <= M is settled. Transactions that never took an id
(erasures, other jobs, dashboard reads, anything in another database) are not waited for.
Not the snapshot's in-progress list (``pg_snapshot_xip``): a transaction gets its xid only when
it writes a row, so one that took an id and then waited (ON CONFLICT behind another insert of
the same event_id) is missing from it, as is any running xid at or above the snapshot's xmax;
and it lists every writer of every database on the server.
SQLite has one writer at a time: ``max(id)`` is already exact there.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import Engine, text

from service.errors import ApiError
from service.selection import max_event_id
from service.settings import Settings

log = logging.getLogger("prospect.jobs")

#: Transactions (other than this one) holding the feedback id sequence's lock: those that
#: have taken an id and not yet ended. A prepared (two-phase) transaction would change its
#: ``virtualtransaction``; the service never prepares one.
_ID_HOLDERS = """
    SELECT virtualtransaction FROM pg_locks
    WHERE locktype = 'relation'
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND relation = CAST(pg_get_serial_sequence('feedback_events', 'id') AS regclass)
      AND pid IS DISTINCT FROM pg_backend_pid()
"""
_SNAPSHOT = text(f"SELECT (SELECT coalesce(max(id), 0) FROM feedback_events), "
                 f"ARRAY({_ID_HOLDERS})")
_STILL = text(f"SELECT DISTINCT virtualtransaction FROM ({_ID_HOLDERS}) AS h "
              "WHERE virtualtransaction = ANY(:holders)")

_FIRST_SLEEP_S = 0.002
_MAX_SLEEP_S = 0.1


class IngestionInFlight(ApiError):
    """503: a transaction holding an id below the freeze outlived PROSPECT_FREEZE_WAIT_S; the
    job is not created (freezing then could miss that event). Retry: ingestion commits in
    milliseconds, so this means a stuck or very slow writer."""

    def __init__(self, n: int, waited_s: float, retry_after_s: int) -> None:
        super().__init__(
            503, "ingestion_in_flight",
            f"{n} ingest transaction(s) holding feedback ids below the newest one did not end "
            f"within {waited_s:g} s (PROSPECT_FREEZE_WAIT_S); the job was not created, retry",
            headers={"Retry-After": str(retry_after_s)})


def frozen_max_event_id(engine: Engine, settings: Settings) -> int:
    """The newest event id, returned once no event at or below it can still commit.

    Call it before, not inside, the transaction that counts and inserts the job: the wait
    holds no lock, so it cannot deadlock with ingestion or another job's creation, and under
    READ COMMITTED that transaction's statements then see every row <= the returned id.
    Raises :class:`IngestionInFlight` after ``settings.freeze_wait_s``."""
    if engine.dialect.name != "postgresql":
        with engine.connect() as conn:
            return max_event_id(conn)
    start = time.monotonic()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        max_id, holders = conn.execute(_SNAPSHOT).one()
        sleep = _FIRST_SLEEP_S
        while holders:
            left = settings.freeze_wait_s - (time.monotonic() - start)
            if left <= 0:
                log.warning("freeze: %d transaction(s) holding feedback ids still open after "
                            "%.1f s; job not created", len(holders), settings.freeze_wait_s)
                raise IngestionInFlight(len(holders), settings.freeze_wait_s,
                                        settings.retry_after_s)
            time.sleep(min(sleep, left))
            sleep = min(sleep * 2, _MAX_SLEEP_S)
            holders = list(conn.execute(_STILL, {"holders": holders}).scalars())
    waited = time.monotonic() - start
    if waited > 0.5:
        log.info("freeze: waited %.2f s for ingest transactions below id %d", waited, max_id)
    return int(max_id)
