"""Which events a training job may use: the window, latest vote only, never the held-out split,
and at most a capped number of events from any one user.

The held-out split is chosen by a hash of ``event_id`` (``split_bucket``, stored at ingestion),
so an event is held out forever, whatever job or fraction asks: no job ever trains on what the
evaluation gate scores. The per-user cap keeps the most recent events of each user, so one
user (or one script) flooding the endpoint cannot decide what the model learns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from sqlalchemy import Connection, Select, and_, case, func, select, true

from service.models import feedback_events as fe
from service.queries import Filters

#: split_bucket is uniform on [0, SPLIT_BUCKETS).
SPLIT_BUCKETS = 10_000
#: Events without a user id are one group for the cap and the distinct-user count: unknown
#: senders must not count as many independent users.
_ANON = ""


def split_bucket(event_id: str) -> int:
    """Stable bucket of an event id. Never change this: stored rows and held-out sets use it."""
    return int.from_bytes(hashlib.sha256(event_id.encode()).digest()[:4], "big") % SPLIT_BUCKETS


@dataclass(frozen=True)
class Selection:
    filters: Filters
    holdout_fraction: float = 0.05
    max_events_per_user: int | None = None
    split: Literal["train", "holdout"] = "train"

    def frozen(self, min_id: int, max_id: int) -> Selection:
        return replace(self, filters=replace(self.filters, min_id=min_id, max_id=max_id))


@dataclass(frozen=True)
class SelectionCounts:
    n_desirable: int
    n_undesirable: int
    n_users: int
    #: Events in the window that the per-user cap left out.
    n_capped: int


def _threshold(fraction: float) -> int:
    return round(fraction * SPLIT_BUCKETS)


def _ranked(sel: Selection) -> Any:
    """The window's events with their rank among the same user's events (newest first)."""
    user = func.coalesce(fe.c.user_hash, _ANON)
    stmt: Select[Any] = select(
        fe.c.id, fe.c.desirable, user.label("user"),
        func.row_number().over(partition_by=user, order_by=fe.c.id.desc()).label("rn"),
        # what iter_selected(corrections=True) adds: a non-empty correction
        case((and_(fe.c.correction.is_not(None), func.trim(fe.c.correction) != ""), 1),
             else_=0).label("corrected"),
    )
    stmt = sel.filters.apply(stmt)
    cut = _threshold(sel.holdout_fraction)
    stmt = stmt.where(fe.c.split_bucket >= cut if sel.split == "train" else fe.c.split_bucket < cut)
    return stmt.subquery("ranked")


def _kept(sel: Selection, ranked: Any) -> Any:
    return ranked.c.rn <= sel.max_events_per_user if sel.max_events_per_user else true()


def count_selection(conn: Connection, sel: Selection, corrections: bool = False) -> SelectionCounts:
    """The classes a job on ``sel`` trains on: with ``corrections`` each stored correction is
    one more desirable example (as :func:`iter_selected` yields it), so λD/λU balance what is
    actually trained."""
    r = _ranked(sel)
    kept = _kept(sel, r)

    def n(cond: Any) -> Any:
        return func.coalesce(func.sum(case((cond, 1), else_=0)), 0)

    row = conn.execute(select(
        n(kept & r.c.desirable.is_(True)),
        n(kept & r.c.desirable.is_(False)),
        func.count(func.distinct(r.c.user)),
        func.count(),
        n(kept & (r.c.corrected == 1)),
    )).one()
    n_d, n_u, n_users, total, n_corr = (int(v) for v in row)
    return SelectionCounts(n_d + (n_corr if corrections else 0), n_u, n_users, total - n_d - n_u)


def max_event_id(conn: Connection) -> int:
    return int(conn.execute(select(func.coalesce(func.max(fe.c.id), 0))).scalar_one())


def iter_selected(conn: Connection, sel: Selection, corrections: bool = False
                  ) -> Iterator[dict[str, Any]]:
    """Rows {id, prompt, completion, label} in id order; with ``corrections`` a stored user
    correction follows its event as an extra desirable completion for the same prompt."""
    r = _ranked(sel)
    stmt = (select(fe.c.id, fe.c.prompt, fe.c.completion, fe.c.desirable, fe.c.correction)
            .join(r, r.c.id == fe.c.id).order_by(fe.c.id))
    stmt = stmt.where(_kept(sel, r))
    result = conn.execution_options(stream_results=True, yield_per=1000).execute(stmt)
    for row_id, prompt, completion, desirable, correction in result:
        yield {"id": row_id, "prompt": prompt, "completion": completion, "label": bool(desirable)}
        if corrections and correction and correction.strip(" "):  # as trim() in the count
            yield {"id": row_id, "prompt": prompt, "completion": correction, "label": True}
