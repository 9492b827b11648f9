"""Model lines: a feedback scope, so a line's jobs read only the feedback of what it served

Every existing line (the default one and any other) gets "all": what it read before this
migration, so an upgrade changes no line's data. New lines other than `default` start as
"served" (service.lines.initial_scope). The scope's condition matches feedback_events on
model_version (ix_feedback_events_model_version, 0001) and checkpoints on line
(ix_checkpoints_line_stage, 0003): no new index is needed.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_lines") as batch:
        batch.add_column(sa.Column("feedback", sa.String(16), nullable=False,
                                   server_default="all"))


def downgrade() -> None:
    # Not batch mode: on SQLite it copies the table and drops the original, and with foreign
    # keys on (service.db) that DROP deletes or refuses the rows that refer to it (job
    # metrics, erasure lineage: ON DELETE CASCADE; checkpoints). SQLite >= 3.35 drops a
    # column in place.
    op.drop_column("model_lines", "feedback")
