"""data rights: erasures and the jobs whose training data they touched

Revision ID: 0004
Revises: 0003
Create Date: 2027-01-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from service.models import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "erasures",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("user_hash", sa.String(64)),
        sa.Column("cutoff", UTCDateTime()),
        sa.Column("n_events", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("min_event_id", BigId),
        sa.Column("max_event_id", BigId),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("key_id", sa.Integer()),
        sa.Column("reason", sa.Text()),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("completed_at", UTCDateTime()),
    )
    op.create_index("ix_erasures_user_hash", "erasures", ["user_hash"])
    op.create_table(
        "erasure_jobs",
        sa.Column("erasure_id", sa.Integer(),
                  sa.ForeignKey("erasures.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("job_id", sa.Integer(),
                  sa.ForeignKey("training_jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("n_trained", sa.Integer(), nullable=False),
        sa.Column("n_held_out", sa.Integer(), nullable=False),
        sa.Column("exact", sa.Boolean(), nullable=False),
        sa.Column("job_status", sa.String(16), nullable=False),
        sa.Column("job_attempt", sa.Integer(), nullable=False),
    )
    op.create_index("ix_erasure_jobs_job_id", "erasure_jobs", ["job_id"])
    # A user erasure finds the user's events by user_hash: without an index it would scan the
    # whole table (and hold its transaction open that long).
    op.create_index("ix_feedback_events_user_hash", "feedback_events", ["user_hash"])


def downgrade() -> None:
    op.drop_index("ix_feedback_events_user_hash", table_name="feedback_events")
    op.drop_index("ix_erasure_jobs_job_id", table_name="erasure_jobs")
    op.drop_table("erasure_jobs")
    op.drop_index("ix_erasures_user_hash", table_name="erasures")
    op.drop_table("erasures")
