"""feedback_events and api_keys

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from service.models import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "feedback_events",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(256), nullable=False),
        sa.Column("payload_hash", sa.String(64), nullable=False),
        sa.Column("prompt", sa.JSON(), nullable=False),
        sa.Column("completion", sa.Text(), nullable=False),
        sa.Column("desirable", sa.Boolean(), nullable=False),
        sa.Column("model_version", sa.String(256), nullable=False),
        sa.Column("user_hash", sa.String(64)),
        sa.Column("session_id", sa.String(256)),
        sa.Column("source", sa.String(256)),
        sa.Column("environment", sa.String(256)),
        sa.Column("trace_id", sa.String(256)),
        sa.Column("request_id", sa.String(256)),
        sa.Column("replaces", sa.String(256)),
        sa.Column("correction", sa.Text()),
        sa.Column("comment", sa.Text()),
        sa.Column("metadata", sa.JSON()),
        sa.Column("occurred_at", UTCDateTime(), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
    )
    op.create_index("uq_feedback_events_event_id", "feedback_events", ["event_id"], unique=True)
    op.create_index("ix_feedback_events_occurred_at_id", "feedback_events", ["occurred_at", "id"])
    op.create_index("ix_feedback_events_model_version", "feedback_events", ["model_version"])
    op.create_index(
        "ix_feedback_events_replaces",
        "feedback_events",
        ["replaces"],
        postgresql_where=sa.text("replaces IS NOT NULL"),
        sqlite_where=sa.text("replaces IS NOT NULL"),
    )

    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(256)),
        sa.Column("display_prefix", sa.String(32), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("scopes", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime()),
        sa.Column("revoked_at", UTCDateTime()),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_index("ix_feedback_events_replaces", table_name="feedback_events")
    op.drop_index("ix_feedback_events_model_version", table_name="feedback_events")
    op.drop_index("ix_feedback_events_occurred_at_id", table_name="feedback_events")
    op.drop_index("uq_feedback_events_event_id", table_name="feedback_events")
    op.drop_table("feedback_events")
