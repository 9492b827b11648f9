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
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError
from sqlalchemy import Connection, Engine, select
from sqlalchemy.dialects import postgresql, sqlite

from service.errors import ApiError, loc_to_field
from service.models import feedback_events
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


def hash_user_id(user_id: str, key: str) -> str:
    """Keyed hash, so raw user ids never reach the database and cannot be brute-forced
    from a dump without the key."""
    return hmac.new(key.encode(), user_id.encode(), hashlib.sha256).hexdigest()


def parse_json_body(raw: bytes) -> Any:
    """orjson rejects invalid UTF-8 and lone surrogates: answer 400 naming the body."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"body: not valid UTF-8 JSON ({exc})",
                       [{"field": "body", "message": str(exc)}]) from None


def validation_errors(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> list[dict[str, str]]:
    return [
        {"field": loc_to_field(prefix + tuple(e["loc"])), "message": e["msg"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]


def reason_of(errors: list[dict[str, str]]) -> str:
    return "; ".join(f"{e['field']}: {e['message']}" for e in errors)


def to_row(item: Any, settings: Settings, now: datetime) -> dict[str, Any]:
    """Validated FeedbackIn -> the row to store, with its payload hash.

    The hash covers the stored representation (user id already hashed, label as a boolean,
    timestamps in UTC), so "up" and true are the same payload.
    """
    row = {
        "event_id": item.event_id,
        "prompt": item.prompt,
        "completion": item.completion,
        "desirable": item.label,
        "model_version": item.model_version,
        "user_hash": hash_user_id(item.user_id, settings.user_id_key) if item.user_id else None,
        "session_id": item.session_id,
        "source": item.source,
        "environment": item.environment,
        "trace_id": item.trace_id,
        "request_id": item.request_id,
        "replaces": item.replaces,
        "correction": item.correction,
        "comment": item.comment,
        "metadata": item.metadata,
        "occurred_at": item.occurred_at,
    }
    row["payload_hash"] = hashlib.sha256(orjson.dumps(row, option=orjson.OPT_SORT_KEYS)).hexdigest()
    if row["occurred_at"] is None:
        row["occurred_at"] = now
    row["received_at"] = now
    return row


def _insert_stmt(conn: Connection) -> Any:
    dialect = conn.dialect.name
    mod = postgresql if dialect == "postgresql" else sqlite
    return (
        mod.insert(feedback_events)
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(feedback_events.c.event_id)
    )


def store_rows(engine: Engine, rows: list[dict[str, Any]]) -> list[str]:
    """Store rows (each with payload_hash); return 'accepted' | 'duplicate' | 'conflict'
    per row, in order. One transaction, one INSERT round trip (+1 lookup if any existed)."""
    if not rows:
        return []
    first: dict[str, dict[str, Any]] = {}
    for row in rows:
        first.setdefault(row["event_id"], row)
    ordered = sorted(first.values(), key=lambda r: r["event_id"])
    with engine.begin() as conn:
        inserted = set(conn.execute(_insert_stmt(conn), ordered).scalars())
        missing = [eid for eid in first if eid not in inserted]
        stored: dict[str, str] = {}
        for start in range(0, len(missing), _LOOKUP_CHUNK):
            chunk = missing[start:start + _LOOKUP_CHUNK]
            stored.update(conn.execute(
                select(feedback_events.c.event_id, feedback_events.c.payload_hash)
                .where(feedback_events.c.event_id.in_(chunk))
            ).tuples().all())
    out: list[str] = []
    for row in rows:
        eid = row["event_id"]
        if eid in inserted and first[eid] is row:
            out.append("accepted")
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
    digest = hashlib.sha256(orjson.dumps(
        [pair.prompt, pair.chosen, pair.rejected, pair.model_version], option=orjson.OPT_SORT_KEYS
    )).hexdigest()[:32]
    return f"pair-{digest}-chosen", f"pair-{digest}-rejected"
