"""The ingestion hot path: validate items one by one, store each event_id exactly once.

Idempotency lives in the database, not in memory: a unique index on ``event_id`` and one
``INSERT ... ON CONFLICT DO NOTHING RETURNING event_id`` per batch. Rows that were not
inserted are looked up and their stored payload hash compared with the submitted one: equal
means a retry (duplicate), different means a conflict; a stored event is never overwritten.
Rows are inserted in event_id order so two concurrent batches with overlapping ids take the
unique-index locks in the same order and cannot deadlock.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError
from sqlalchemy import Connection, Engine, delete, select
from sqlalchemy.exc import DBAPIError

from service import user_locks
from service.db import dialect_insert
from service.errors import ApiError, loc_to_field
from service.models import erased_event_ids, feedback_events
from service.redaction import redact_row
from service.schemas import prompt_value
from service.selection import split_bucket
from service.settings import Settings

#: SQLite's default host-parameter limit is 32766; keep IN lists well below it.
_LOOKUP_CHUNK = 900

_COLUMNS = (
    "event_id", "prompt", "completion", "desirable", "model_version", "user_hash",
    "session_id", "source", "environment", "trace_id", "request_id", "replaces",
    "correction", "comment", "metadata", "occurred_at",
)


@dataclass
class Outcome:
    """Result for one submitted item, in submission order."""

    index: int
    event_id: str | None
    status: str
    reason: str | None = None
    errors: list[dict[str, str]] | None = None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"index": self.index, "event_id": self.event_id, "status": self.status}
        if self.reason is not None:
            d["reason"] = self.reason
        if self.errors is not None:
            d["errors"] = self.errors
        return d


@lru_cache(maxsize=65536)
def event_id_hash(event_id: str) -> str:
    """How an erased event id is kept (``erased_event_ids``); Postgres computes the same as
    ``encode(sha256(convert_to(event_id, 'UTF8')), 'hex')``."""
    return hashlib.sha256(event_id.encode()).hexdigest()


@lru_cache(maxsize=65536)
def hash_user_id(user_id: str, key: str) -> str:
    """Keyed hash, so raw user ids never reach the database and cannot be brute-forced
    from a dump without the key. Cached: the same users vote again and again."""
    return hmac.digest(key.encode(), user_id.encode(), "sha256").hex()


def parse_json_body(raw: bytes) -> Any:
    """orjson rejects invalid UTF-8 and lone surrogates: answer 400 naming the body."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"body: not valid UTF-8 JSON ({exc})",
                       [{"field": "body", "message": str(exc)}]) from None


_PROMPT_SHAPE = "must be a string or a list of {role, content} messages"


def validation_errors(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> list[dict[str, str]]:
    """pydantic errors as [{field, message}], with the prompt union's branches collapsed:
    only the branch matching the input's type speaks, or one message when neither does."""
    out: list[dict[str, str]] = []
    prompt_str: list[dict[str, str]] = []
    prompt_list: list[dict[str, str]] = []
    in_union = False  # a prompt that is there but fits neither branch (not a missing one)
    for e in exc.errors(include_url=False, include_input=False):
        loc = tuple(e["loc"])
        if len(loc) >= 2 and loc[0] == "prompt" and isinstance(loc[1], str):
            in_union = True
            entry = {"field": loc_to_field(prefix + ("prompt",) + loc[2:]), "message": e["msg"]}
            if loc[1].startswith("list["):
                if e["type"] != "list_type":
                    prompt_list.append(entry)
            elif e["type"] != "string_type":
                prompt_str.append(entry)
            continue
        out.append({"field": loc_to_field(prefix + loc), "message": e["msg"]})
    prompt = prompt_str or prompt_list
    if not prompt and in_union:
        prompt = [{"field": loc_to_field(prefix + ("prompt",)), "message": _PROMPT_SHAPE}]
    return prompt + out


def reason_of(errors: list[dict[str, str]]) -> str:
    return "; ".join(f"{e['field']}: {e['message']}" for e in errors)


def to_row(item: Any, settings: Settings, now: datetime) -> dict[str, Any]:
    """Validated FeedbackIn -> the row to store, with its payload hash.

    The hash covers the stored representation (user id already hashed, label as a boolean,
    timestamps in UTC, e-mails and phone numbers redacted when PROSPECT_REDACT_PII is on), so
    "up" and true are the same payload.
    """
    d = item.__dict__
    user_id = d["user_id"]
    row = {
        "event_id": d["event_id"],
        "prompt": prompt_value(d["prompt"]),
        "completion": d["completion"],
        "desirable": d["label"],
        "model_version": d["model_version"],
        "user_hash": hash_user_id(user_id, settings.user_id_key) if user_id else None,
        "session_id": d["session_id"],
        "source": d["source"],
        "environment": d["environment"],
        "trace_id": d["trace_id"],
        "request_id": d["request_id"],
        "replaces": d["replaces"],
        "correction": d["correction"],
        "comment": d["comment"],
        "metadata": d["metadata"],
        "occurred_at": d["occurred_at"],
    }
    if settings.redact_pii:
        # Before the hash: a retry redacts to the same text and stays a duplicate.
        redact_row(row)
    row["payload_hash"] = hashlib.sha256(orjson.dumps(row, option=orjson.OPT_SORT_KEYS)).hexdigest()
    if row["occurred_at"] is None:
        row["occurred_at"] = now
    row["received_at"] = now
    # Derived from event_id, so outside the payload hash (and rows stored before it existed
    # keep matching their retries).
    row["split_bucket"] = split_bucket(row["event_id"])
    return row


def _insert_stmt(conn: Connection) -> Any:
    """Portable Core INSERT ... ON CONFLICT DO NOTHING RETURNING (SQLite; PG fallback)."""
    return (
        dialect_insert(conn, feedback_events)
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(feedback_events.c.event_id)
    )


#: Postgres fast path: the whole batch travels as ONE json parameter, unpacked server-side by
#: json_to_recordset. A multi-VALUES INSERT of 1,000 rows x 18 columns spends most of its
#: time building and parsing 18,000 placeholders, and per-column arrays are escaped in
#: Python; orjson encodes the batch in C and Postgres parses it in C. The SQL text is
#: constant, so it is prepared once per connection.
_PG_TYPES = {
    "event_id": "text", "payload_hash": "text", "prompt": "json", "completion": "text",
    "desirable": "boolean", "model_version": "text", "user_hash": "text", "session_id": "text",
    "source": "text", "environment": "text", "trace_id": "text", "request_id": "text",
    "replaces": "text", "correction": "text", "comment": "text", "metadata": "json",
    "occurred_at": "timestamptz", "received_at": "timestamptz", "split_bucket": "smallint",
}
_PG_COLS = ", ".join(_PG_TYPES)
_PG_BATCH_SQL = (
    f"INSERT INTO feedback_events ({_PG_COLS}) SELECT {_PG_COLS} "
    f"FROM json_to_recordset(%s::json) AS x("
    + ", ".join(f"{c} {t}" for c, t in _PG_TYPES.items())
    + ") WHERE NOT EXISTS (SELECT 1 FROM erased_event_ids e"
    " WHERE e.event_id_hash = encode(sha256(convert_to(x.event_id, 'UTF8')), 'hex'))"
    " ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
)


def _pg_insert(conn: Connection, rows: list[dict[str, Any]], lock_keys: list[int]) -> set[str]:
    """The batch INSERT on an autocommit connection: its own transaction, one round trip.

    With ``lock_keys`` (service.user_locks) the users' shared locks are taken first, in the
    same transaction and the same round trip: both statements are pipelined before a single
    Sync, which makes them one implicit transaction (PostgreSQL protocol, "Pipelining"). The
    INSERT's snapshot is taken after the lock wait, so it sees the erased ids of an erasure it
    waited for, and an erasure that waits for it sees its rows. An explicit BEGIN ... COMMIT
    would cost three more round trips per request."""
    payload = orjson.dumps(rows).decode()
    if not lock_keys:
        return {eid for (eid,) in conn.exec_driver_sql(_PG_BATCH_SQL, (payload,))}
    raw = conn.connection.driver_connection
    dbapi = conn.dialect.loaded_dbapi
    try:
        with raw.pipeline():
            raw.execute(user_locks.SHARED_SQL, (lock_keys,))
            cur = raw.execute(_PG_BATCH_SQL, (payload,))
        return {eid for (eid,) in cur.fetchall()}
    except dbapi.Error as exc:
        # Past SQLAlchemy's cursor, so wrap as it would: a lost connection is invalidated
        # and answers 503 like any other statement's.
        lost = conn.dialect.is_disconnect(exc, raw, None)
        if lost:
            conn.invalidate(exc)
        raise DBAPIError.instance(_PG_BATCH_SQL, None, exc, dbapi.Error,
                                  connection_invalidated=lost, dialect=conn.dialect) from exc


def _erased(conn: Connection, event_ids: list[str]) -> set[str]:
    """Which of ``event_ids`` a user erasure deleted (``erased_event_ids``)."""
    hashes = {event_id_hash(e): e for e in event_ids}
    found: set[str] = set()
    keys = list(hashes)
    for start in range(0, len(keys), _LOOKUP_CHUNK):
        found.update(conn.execute(select(erased_event_ids.c.event_id_hash).where(
            erased_event_ids.c.event_id_hash.in_(keys[start:start + _LOOKUP_CHUNK]))).scalars())
    return {hashes[h] for h in found}


def store_rows(engine: Engine, rows: list[dict[str, Any]]) -> list[str]:
    """Store rows (each with payload_hash); return 'accepted' | 'duplicate' | 'conflict'
    per row, in order. One transaction, one INSERT round trip (+1 lookup if any existed).

    An event id that a user erasure deleted is a 'duplicate' (it was received before) and is
    not stored again: the erased feedback must not come back with a client's retry. The
    transaction is ordered wholly before or wholly after each transaction of an erasure of
    one of its users (service.user_locks; on SQLite the INSERT takes the write lock before the
    erased ids are read)."""
    if not rows:
        return []
    first: dict[str, dict[str, Any]] = {}
    for row in rows:
        first.setdefault(row["event_id"], row)
    ordered = sorted(first.values(), key=lambda r: r["event_id"])
    pg = engine.dialect.name == "postgresql"
    # Postgres: autocommit, so the INSERT (after the users' locks, see _pg_insert) is its own
    # transaction (atomic) and a batch costs one round trip instead of BEGIN + INSERT +
    # COMMIT. Stored events are immutable, so reading the existing hashes afterwards in a
    # separate statement is exact.
    with (engine.connect().execution_options(isolation_level="AUTOCOMMIT") if pg
          else engine.begin()) as conn:
        if pg:  # the INSERT itself skips erased ids
            inserted = _pg_insert(conn, ordered,
                                  user_locks.ingest_keys(r["user_hash"] for r in ordered))
            erased: set[str] = set()
        else:
            # The INSERT first: it takes SQLite's write lock, so the erased ids read next stay
            # current until this commits. Read before it (pysqlite begins the transaction at
            # the first write), an erasure could commit in between and its events come back.
            inserted = set(conn.execute(_insert_stmt(conn), ordered).scalars())
            erased = _erased(conn, sorted(inserted)) if inserted else set()
            back = sorted(erased)
            for start in range(0, len(back), _LOOKUP_CHUNK):
                conn.execute(delete(feedback_events).where(
                    feedback_events.c.event_id.in_(back[start:start + _LOOKUP_CHUNK])))
            inserted -= erased
        missing = [eid for eid in first if eid not in inserted]
        stored: dict[str, str] = {}
        for start in range(0, len(missing), _LOOKUP_CHUNK):
            chunk = missing[start:start + _LOOKUP_CHUNK]
            stored.update(conn.execute(
                select(feedback_events.c.event_id, feedback_events.c.payload_hash)
                .where(feedback_events.c.event_id.in_(chunk))
            ).tuples().all())
        gone = [eid for eid in missing if eid not in stored and eid not in erased]
        if gone:
            erased |= _erased(conn, gone)
    out: list[str] = []
    for row in rows:
        eid = row["event_id"]
        if eid in inserted and first[eid] is row:
            out.append("accepted")
            continue
        if eid in erased:
            out.append("duplicate")
            continue
        existing = first[eid]["payload_hash"] if eid in inserted else stored.get(eid)
        out.append("duplicate" if existing == row["payload_hash"] else "conflict")
    return out


def ingest_items(
    items: list[Any], model: type[BaseModel], settings: Settings, engine: Engine
) -> list[Outcome]:
    """Validate each raw item on its own, store the valid ones, report every item."""
    now = datetime.now(UTC)
    outcomes: list[Outcome] = []
    rows: list[dict[str, Any]] = []
    row_outcomes: list[Outcome] = []
    validate = model.model_validate
    for i, raw in enumerate(items):
        eid = raw.get("event_id") if isinstance(raw, dict) else None
        eid = eid if isinstance(eid, str) else None
        try:
            if not isinstance(raw, dict):
                raise ApiError(422, "invalid", "must be a JSON object",
                               [{"field": "body", "message": "each event must be a JSON object"}])
            item = validate(raw)
        except ValidationError as exc:
            errs = validation_errors(exc)
            outcomes.append(Outcome(i, eid, "rejected", reason_of(errs), errs))
            continue
        except ApiError as exc:
            outcomes.append(Outcome(i, eid, "rejected", "event: must be a JSON object", exc.errors))
            continue
        row = to_row(item, settings, now)
        rows.append(row)
        out = Outcome(i, item.event_id, "accepted")
        row_outcomes.append(out)
        outcomes.append(out)
    for out, status in zip(row_outcomes, store_rows(engine, rows), strict=True):
        out.status = status
        if status == "conflict":
            out.reason = "event_id: already stored with a different payload"
    return outcomes


def pair_event_ids(pair: Any) -> tuple[str, str]:
    """Deterministic ids from the pair's content, so importing the same file twice stores
    nothing new."""
    content = [prompt_value(pair.prompt), pair.chosen, pair.rejected, pair.model_version]
    digest = hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]
    return f"pair-{digest}-chosen", f"pair-{digest}-rejected"
