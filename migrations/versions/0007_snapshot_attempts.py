"""π_ref snapshots: count the deliveries that claimed one, so the sweep gives up on it

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reference_snapshots") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    # Not batch mode: on SQLite it copies the table and drops the original, and with foreign
    # keys on (service.db) that DROP refuses or nulls what refers to it (jobs, checkpoints).
    # SQLite >= 3.35 drops a column in place.
    op.drop_column("reference_snapshots", "attempts")
