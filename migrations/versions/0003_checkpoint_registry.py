"""checkpoint registry: checkpoints, append-only rollout_events, webhook outbox

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from service.models import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_PRODUCTION = sa.text("stage = 'production'")
_CANARY = sa.text("stage = 'canary'")

_PG_APPEND_ONLY = """
CREATE OR REPLACE FUNCTION rollout_events_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'rollout_events is append-only';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER rollout_events_no_update BEFORE UPDATE OR DELETE ON rollout_events
    FOR EACH ROW EXECUTE FUNCTION rollout_events_append_only();
"""
_SQLITE_APPEND_ONLY = [
    "CREATE TRIGGER rollout_events_no_update BEFORE UPDATE ON rollout_events "
    "BEGIN SELECT RAISE(ABORT, 'rollout_events is append-only'); END",
    "CREATE TRIGGER rollout_events_no_delete BEFORE DELETE ON rollout_events "
    "BEGIN SELECT RAISE(ABORT, 'rollout_events is append-only'); END",
]


def upgrade() -> None:
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("line", sa.String(64), sa.ForeignKey("model_lines.name"), nullable=False),
        sa.Column("model_version", sa.String(256), nullable=False),
        sa.Column("job_id", sa.Integer(),
                  sa.ForeignKey("training_jobs.id", ondelete="RESTRICT")),
        sa.Column("reference_snapshot_id", sa.Integer(),
                  sa.ForeignKey("reference_snapshots.id", ondelete="RESTRICT")),
        sa.Column("parent_id", sa.Integer(), sa.ForeignKey("checkpoints.id")),
        sa.Column("base_model", sa.String(1024), nullable=False),
        sa.Column("artifact_path", sa.String(1024)),
        sa.Column("adapter_path", sa.String(1024)),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("manifest_sha256", sa.String(64)),
        sa.Column("size_bytes", sa.BigInteger()),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("canary_percent", sa.Float()),
        sa.Column("metrics", sa.JSON()),
        sa.Column("reason", sa.Text()),
        sa.Column("previous_production_id", sa.Integer(), sa.ForeignKey("checkpoints.id")),
        sa.Column("next_reference_id", sa.Integer(),
                  sa.ForeignKey("reference_snapshots.id", ondelete="SET NULL")),
        sa.Column("gate_attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("gate_token", sa.String(64)),
        sa.Column("gate_sent_at", UTCDateTime()),
        sa.Column("gate_heartbeat_at", UTCDateTime()),
        sa.Column("gate_error", sa.Text()),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("stage_changed_at", UTCDateTime(), nullable=False),
        sa.Column("evaluated_at", UTCDateTime()),
        sa.Column("files_deleted_at", UTCDateTime()),
    )
    op.create_index("uq_checkpoints_model_version", "checkpoints", ["model_version"],
                    unique=True)
    op.create_index("uq_checkpoints_job_id", "checkpoints", ["job_id"], unique=True)
    op.create_index("ix_checkpoints_line_stage", "checkpoints", ["line", "stage"])
    op.create_index("uq_checkpoints_production_line", "checkpoints", ["line"], unique=True,
                    postgresql_where=_PRODUCTION, sqlite_where=_PRODUCTION)
    op.create_index("uq_checkpoints_canary_line", "checkpoints", ["line"], unique=True,
                    postgresql_where=_CANARY, sqlite_where=_CANARY)

    op.create_table(
        "rollout_events",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("line", sa.String(64), nullable=False),
        sa.Column("checkpoint_id", sa.Integer(), sa.ForeignKey("checkpoints.id")),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("from_stage", sa.String(16)),
        sa.Column("to_stage", sa.String(16)),
        sa.Column("canary_percent", sa.Float()),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("key_id", sa.Integer()),
        sa.Column("reason", sa.Text()),
        sa.Column("details", sa.JSON()),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_rollout_events_line_id", "rollout_events", ["line", "id"])
    op.create_index("ix_rollout_events_checkpoint_id", "rollout_events",
                    ["checkpoint_id", "id"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_APPEND_ONLY)
    else:
        for stmt in _SQLITE_APPEND_ONLY:
            op.execute(stmt)

    op.create_table(
        "notifications",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("dedup_key", sa.String(256), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
        sa.Column("last_error", sa.Text()),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("sent_at", UTCDateTime()),
    )
    op.create_index("uq_notifications_dedup_key", "notifications", ["dedup_key"], unique=True)
    op.create_index("ix_notifications_status_next", "notifications",
                    ["status", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_notifications_status_next", table_name="notifications")
    op.drop_index("uq_notifications_dedup_key", table_name="notifications")
    op.drop_table("notifications")
    op.drop_index("ix_rollout_events_checkpoint_id", table_name="rollout_events")
    op.drop_index("ix_rollout_events_line_id", table_name="rollout_events")
    op.drop_table("rollout_events")  # its triggers go with it
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS rollout_events_append_only()")
    for name in ("uq_checkpoints_canary_line", "uq_checkpoints_production_line",
                 "ix_checkpoints_line_stage", "uq_checkpoints_job_id",
                 "uq_checkpoints_model_version"):
        op.drop_index(name, table_name="checkpoints")
    op.drop_table("checkpoints")
