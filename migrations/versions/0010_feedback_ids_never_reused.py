"""feedback_events.id AUTOINCREMENT on SQLite: a deleted event's id is never handed out again

Without AUTOINCREMENT SQLite gives a new row max(id) + 1, so once the newest events are deleted
(a user erasure, feedback retention) the next event gets an id an erased one had. Jobs freeze
their data as the id range ``(min_event_id, max_event_id]``: a queued or retried job would then
read an event that arrived after it froze its data, and the erasure lineage and the id-ordered
listings assume ids only grow. AUTOINCREMENT keeps the largest id ever used in
``sqlite_sequence``. SQLite cannot add it in place, so the table is rebuilt (same columns, rows
and indexes; no foreign key refers to it). Postgres uses a sequence, never reused: nothing to do.

The counter starts at the largest id known to have been used: the rows' own, and those recorded
by erasures and jobs. An id deleted before this migration above all of those leaves no trace and
may still be given once more.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

#: The largest feedback_events.id known to have existed: rows left, ranges deleted, ranges frozen.
_LARGEST_USED = """(SELECT max(coalesce((SELECT max(id) FROM feedback_events), 0),
                          coalesce((SELECT max(max_event_id) FROM erasures), 0),
                          coalesce((SELECT max(max_event_id) FROM training_jobs), 0)))"""


def _sqlite() -> bool:
    return op.get_context().dialect.name == "sqlite"


def upgrade() -> None:
    if not _sqlite():
        return
    # The copy inserts explicit ids, which already sets sqlite_sequence to the rows' max(id).
    with op.batch_alter_table("feedback_events", recreate="always",
                              table_kwargs={"sqlite_autoincrement": True}):
        pass
    # sqlite_sequence has no unique name: update the row if the copy made one, else add it.
    op.execute(f"UPDATE sqlite_sequence SET seq = max(seq, {_LARGEST_USED}) "
               "WHERE name = 'feedback_events'")
    op.execute(f"INSERT INTO sqlite_sequence (name, seq) SELECT 'feedback_events', {_LARGEST_USED} "
               f"WHERE {_LARGEST_USED} > 0 "
               "AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'feedback_events')")


def downgrade() -> None:
    if not _sqlite():
        return
    # Dropping the AUTOINCREMENT table also drops its sqlite_sequence row.
    with op.batch_alter_table("feedback_events", recreate="always",
                              table_kwargs={"sqlite_autoincrement": False}):
        pass
