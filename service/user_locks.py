"""Advisory locks that order a user erasure against the ingestion of that user's events
(Postgres; on SQLite one writer at a time orders them already, and these do nothing).

An ingest transaction that stores events of named users holds, from before its INSERT until
it commits, each of those users' lock in shared mode; one that writes more than
``MAX_USER_LOCKS`` distinct users holds the one bulk lock in shared mode instead, because
Postgres keeps a single lock table for every session (``max_locks_per_transaction`` x
connections, about 6,400 entries by default) and a batch of 1,000 users must not take 1,000.
Each transaction of a user erasure holds the bulk lock and its user's lock exclusively.

So ingest transactions never wait for one another; one that writes a user being erased waits
for the erasure's transaction in flight (a large batch: for any erasure's), and the erasure's
next transaction waits for it. Transaction-level locks: commit, rollback or a dropped
connection releases them. Every transaction takes its keys in one order (the bulk key first,
then user keys ascending), so they cannot deadlock among themselves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from sqlalchemy import Connection

#: An ingest transaction writing more distinct users than this takes the bulk lock instead.
MAX_USER_LOCKS = 64

#: Take the keys (the one parameter, a list) in the list's order, until the transaction ends.
SHARED_SQL = "SELECT pg_advisory_xact_lock_shared(k) FROM unnest(%s::bigint[]) AS k"
EXCLUSIVE_SQL = "SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS k"


def _key(name: bytes, kind: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(name, digest_size=8, person=kind).digest(), "big",
                          signed=True)


#: Held shared by ingest transactions with many users, exclusively by every erasure.
BULK_KEY = _key(b"bulk", b"prospect.locks")


def user_key(user_hash: str) -> int:
    """A stable signed 64-bit key for the user hash ingestion stores (``user_hash``)."""
    return _key(user_hash.encode(), b"prospect.user")


def ingest_keys(user_hashes: Iterable[str | None]) -> list[int]:
    """The keys an ingest transaction writing these users takes, shared, in order; none for
    anonymous events (no erasure can name them)."""
    users = {h for h in user_hashes if h}
    if len(users) > MAX_USER_LOCKS:
        return [BULK_KEY]
    return sorted(user_key(h) for h in users)


def erasure_keys(user_hash: str) -> list[int]:
    """The keys each transaction of this user's erasure takes, exclusively, in order."""
    return [BULK_KEY, user_key(user_hash)]


def hold(conn: Connection, keys: list[int], *, shared: bool) -> None:
    """Take ``keys`` until ``conn``'s transaction ends (Postgres; nothing on SQLite). Under
    READ COMMITTED the next statement's snapshot is taken after the wait, so it sees what the
    transaction it waited for committed."""
    if keys and conn.dialect.name == "postgresql":
        conn.exec_driver_sql(SHARED_SQL if shared else EXCLUSIVE_SQL, (keys,))
