"""training jobs: count operator retries and keep what each retried run ended with

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.add_column(sa.Column("retries", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("retry_history", sa.JSON(), nullable=True))


def downgrade() -> None:
    # Not batch mode: on SQLite it copies the table and drops the original, and with foreign
    # keys on (service.db) that DROP deletes or refuses the rows that refer to it (job
    # metrics, erasure lineage: ON DELETE CASCADE; checkpoints). SQLite >= 3.35 drops a
    # column in place.
    op.drop_column("training_jobs", "retry_history")
    op.drop_column("training_jobs", "retries")
