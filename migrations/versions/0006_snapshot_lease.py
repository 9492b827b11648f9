"""π_ref snapshots: a heartbeat, so one worker copies a snapshot and duplicates of its task leave it

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from service.models import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reference_snapshots") as batch:
        batch.add_column(sa.Column("heartbeat_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("claim_token", sa.String(32), nullable=True))


def downgrade() -> None:
    # Not batch mode: on SQLite it copies the table and drops the original, and with foreign
    # keys on (service.db) that DROP refuses or nulls what refers to it (jobs, checkpoints).
    # SQLite >= 3.35 drops a column in place.
    op.drop_column("reference_snapshots", "claim_token")
    op.drop_column("reference_snapshots", "heartbeat_at")
