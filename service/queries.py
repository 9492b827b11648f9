"""Read-side queries: listing, export, and the counts the balancer needs.

A line's feedback scope (``Filters.served_by``, see service.lines) is an exact condition on
``model_version``: the line's base version or one of its checkpoints' versions, never a
prefix or LIKE pattern, so line ``a`` never takes line ``a-b``'s events.

"Only the latest vote counts": an event that another stored event of the same user names in
``replaces`` is excluded at query time (NOT EXISTS on the partial index ``ix_feedback_events_replaces``), so
a late-arriving replacement takes effect without rewriting stored rows.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import (
    Boolean,
    ColumnElement,
    Connection,
    Select,
    and_,
    case,
    exists,
    func,
    literal,
    or_,
    select,
    union_all,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.visitors import InternalTraversal

from service.balance import BalanceResult, compute_weights
from service.errors import ApiError
from service.lines import base_version, served_by
from service.models import checkpoints as ck
from service.models import feedback_events as fe

_replacer = fe.alias("replacer")


@dataclass(frozen=True)
class Filters:
    since: datetime | None = None
    until: datetime | None = None
    model_version: str | None = None
    label: bool | None = None
    source: str | None = None
    include_replaced: bool = False
    #: Frozen id range (min_id, max_id]: a job's data stays what it was when it was created,
    #: including which votes had been replaced by then.
    min_id: int | None = None
    max_id: int | None = None
    #: Only events of versions this line served (a line with the "served" scope).
    served_by: str | None = None
    #: With ``served_by``: only checkpoints with id <= this count (a job freezes it, so a
    #: checkpoint registered later cannot add rows to data already counted).
    max_checkpoint_id: int | None = None

    def apply(self, stmt: Select[Any]) -> Select[Any]:
        """Time window on occurred_at is [since, until)."""
        if self.served_by is not None:
            stmt = stmt.where(InSubquery(fe.c.model_version,
                                         served_versions(self.served_by, self.max_checkpoint_id)))
        if self.min_id is not None:
            stmt = stmt.where(fe.c.id > self.min_id)
        if self.max_id is not None:
            stmt = stmt.where(fe.c.id <= self.max_id)
        if self.since is not None:
            stmt = stmt.where(fe.c.occurred_at >= self.since)
        if self.until is not None:
            stmt = stmt.where(fe.c.occurred_at < self.until)
        if self.model_version is not None:
            stmt = stmt.where(fe.c.model_version == self.model_version)
        if self.label is not None:
            stmt = stmt.where(fe.c.desirable.is_(self.label))
        if self.source is not None:
            stmt = stmt.where(fe.c.source == self.source)
        if not self.include_replaced:
            # a vote replaces the same user's earlier vote only (anonymous: another anonymous
            # one): another user's event naming it must not drop it from training
            replaced = exists().where(_replacer.c.replaces == fe.c.event_id,
                                      _replacer.c.user_hash.is_not_distinct_from(fe.c.user_hash))
            if self.max_id is not None:
                replaced = replaced.where(_replacer.c.id <= self.max_id)
            stmt = stmt.where(~replaced)
        return stmt


def served_versions(line: str, max_checkpoint_id: int | None = None) -> Any:
    """The versions ``line`` served, as a subquery: ``<line>-base`` and each of its
    checkpoints' model_version (checkpoints with id <= ``max_checkpoint_id`` when given)."""
    ckpts = select(ck.c.model_version).where(ck.c.line == line)
    if max_checkpoint_id is not None:
        ckpts = ckpts.where(ck.c.id <= max_checkpoint_id)
    return union_all(select(literal(base_version(line)).label("model_version")), ckpts)


def line_scope(conn: Connection, line: dict[str, Any], frozen: bool = False) -> Filters:
    """A line row's feedback scope as filters (service.lines): every event, or only the
    versions it served; ``frozen`` pins its checkpoints to those registered now, as a job
    does when it freezes its data."""
    name = served_by(line)
    if name is None:
        return Filters()
    upto = None
    if frozen:
        upto = int(conn.execute(select(func.coalesce(func.max(ck.c.id), 0))
                                .where(ck.c.line == name)).scalar_one())
    return Filters(served_by=name, max_checkpoint_id=upto)


class InSubquery(ColumnElement[bool]):
    """``column IN (subquery)``; on Postgres ``column = ANY(ARRAY(subquery))``: the array is
    computed once and probes the column's index, where the planner would hash-join a plain IN
    against a scan of every event (it cannot know how many rows the versions match)."""

    inherit_cache = True
    type = Boolean()
    _is_implicitly_boolean = True  # a comparison: no "= 1" on SQLite
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement),
                           ("subquery", InternalTraversal.dp_clauseelement)]

    def __init__(self, column: ColumnElement[Any], subquery: Any) -> None:
        self.column = column
        self.subquery = subquery


@compiles(InSubquery)
def _in_subquery(element: InSubquery, compiler: Any, **kw: Any) -> str:
    return f"{compiler.process(element.column, **kw)} IN ({compiler.process(element.subquery, **kw)})"


@compiles(InSubquery, "postgresql")
def _in_subquery_pg(element: InSubquery, compiler: Any, **kw: Any) -> str:
    return (f"{compiler.process(element.column, **kw)} = "
            f"ANY(ARRAY({compiler.process(element.subquery, **kw)}))")


def encode_cursor(occurred_at: datetime, row_id: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([occurred_at.isoformat(), row_id])).decode()


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    """Any cursor the API could have issued: a UTC instant and a row id within bigint."""
    try:
        occ, row_id = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
        at = datetime.fromisoformat(occ)
        at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)  # year-1 offsets overflow here
        row_id = int(row_id)
        if not 1 <= row_id <= 2**63 - 1:
            raise ValueError(row_id)
        return at, row_id
    except Exception:  # noqa: BLE001 - any malformed cursor is the client's error
        raise ApiError(422, "invalid_cursor", "cursor: not a cursor this API issued",
                       [{"field": "cursor", "message": "malformed"}]) from None


def row_to_out(r: Any) -> dict[str, Any]:
    return {
        "id": r.id, "event_id": r.event_id, "prompt": r.prompt, "completion": r.completion,
        "label": "up" if r.desirable else "down", "model_version": r.model_version,
        "user_hash": r.user_hash, "session_id": r.session_id, "source": r.source,
        "environment": r.environment, "trace_id": r.trace_id, "request_id": r.request_id,
        "replaces": r.replaces, "correction": r.correction, "comment": r.comment,
        "metadata": r.metadata, "occurred_at": r.occurred_at, "received_at": r.received_at,
    }


def list_page(
    conn: Connection, filters: Filters, limit: int, cursor: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first, keyset-paginated on (occurred_at, id): stable under concurrent inserts
    and O(limit) per page at any depth."""
    stmt = filters.apply(select(*[fe.c[n] for n in _OUT_COLUMNS]))
    if cursor:
        occ, row_id = decode_cursor(cursor)
        stmt = stmt.where(or_(fe.c.occurred_at < occ,
                              and_(fe.c.occurred_at == occ, fe.c.id < row_id)))
    stmt = stmt.order_by(fe.c.occurred_at.desc(), fe.c.id.desc()).limit(limit + 1)
    rows = conn.execute(stmt).all()
    more = len(rows) > limit
    rows = rows[:limit]
    nxt = encode_cursor(rows[-1].occurred_at, rows[-1].id) if more and rows else None
    return [row_to_out(r) for r in rows], nxt


_OUT_COLUMNS = [c.name for c in fe.c if c.name != "payload_hash"]


def export_stmt(filters: Filters) -> Select[Any]:
    return filters.apply(
        select(fe.c.prompt, fe.c.completion, fe.c.desirable, fe.c.correction)
    ).order_by(fe.c.occurred_at, fe.c.id)


def iter_training_examples(
    conn: Connection, filters: Filters, corrections: bool = False
) -> Iterator[dict[str, Any]]:
    """TRL's unpaired KTO rows {prompt, completion, label} for the window, oldest first.

    Only the latest vote on an answer is included (see Filters). With ``corrections``, each
    stored user correction is emitted as an extra desirable completion for the same prompt.
    Streams from a server-side cursor on Postgres.
    """
    result = conn.execution_options(stream_results=True, yield_per=1000).execute(
        export_stmt(filters)
    )
    for prompt, completion, desirable, correction in result:
        yield {"prompt": prompt, "completion": completion, "label": bool(desirable)}
        if corrections and correction and correction.strip(" "):  # as selection's count
            yield {"prompt": prompt, "completion": correction, "label": True}


def count_by_label(conn: Connection, filters: Filters) -> tuple[int, int]:
    """(nD, nU) over the window, counting only the latest vote on each answer."""
    stmt = filters.apply(select(
        func.coalesce(func.sum(case((fe.c.desirable.is_(True), 1), else_=0)), 0),
        func.coalesce(func.sum(case((fe.c.desirable.is_(False), 1), else_=0)), 0),
    ))
    n_d, n_u = conn.execute(stmt).one()
    return int(n_d), int(n_u)


def balance(conn: Connection, filters: Filters, target_ratio: float, min_per_class: int
            ) -> BalanceResult:
    n_d, n_u = count_by_label(conn, filters)
    return compute_weights(n_d, n_u, target_ratio, min_per_class)


def daily_counts(conn: Connection, filters: Filters) -> list[dict[str, Any]]:
    """Counts per UTC day (sessions run with timezone=UTC; SQLite stores naive UTC)."""
    day = func.date(fe.c.occurred_at)
    stmt = filters.apply(select(
        day.label("day"),
        func.sum(case((fe.c.desirable.is_(True), 1), else_=0)),
        func.sum(case((fe.c.desirable.is_(False), 1), else_=0)),
    )).group_by(day).order_by(day)
    return [
        {"day": str(d), "n_desirable": int(a), "n_undesirable": int(b)}
        for d, a, b in conn.execute(stmt).all()
    ]
