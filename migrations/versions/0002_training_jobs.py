"""model lines, reference snapshots, training jobs, job metrics; feedback split bucket

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from service.models import UTCDateTime
from service.selection import split_bucket

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_ACTIVE = sa.text("status IN ('queued', 'running')")


def _backfill_split_bucket() -> None:
    conn = op.get_bind()
    fe = sa.table("feedback_events", sa.column("id", sa.Integer), sa.column("event_id", sa.String),
                  sa.column("split_bucket", sa.SmallInteger))
    last = 0
    while True:
        rows = conn.execute(sa.select(fe.c.id, fe.c.event_id).where(fe.c.id > last)
                            .order_by(fe.c.id).limit(5000)).all()
        if not rows:
            return
        conn.execute(sa.update(fe).where(fe.c.id == sa.bindparam("rid"))
                     .values(split_bucket=sa.bindparam("b")),
                     [{"rid": r.id, "b": split_bucket(r.event_id)} for r in rows])
        last = rows[-1].id


def upgrade() -> None:
    with op.batch_alter_table("feedback_events") as batch:
        batch.add_column(sa.Column("split_bucket", sa.SmallInteger(), nullable=False,
                                   server_default="0"))
    _backfill_split_bucket()

    op.create_table(
        "model_lines",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("base_model", sa.String(1024), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "reference_snapshots",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("line", sa.String(64), sa.ForeignKey("model_lines.name"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("source", sa.String(1024), nullable=False),
        sa.Column("content_hash", sa.String(64)),
        sa.Column("path", sa.String(1024)),
        sa.Column("size_bytes", sa.BigInteger()),
        sa.Column("same_as_id", sa.Integer()),
        sa.Column("error", sa.Text()),
        sa.Column("requested_by", sa.Integer()),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime()),
    )
    op.create_index("ix_reference_snapshots_line_id", "reference_snapshots", ["line", "id"])
    op.create_table(
        "training_jobs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("line", sa.String(64), sa.ForeignKey("model_lines.name"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("requested_by", sa.Integer()),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("filters", sa.JSON(), nullable=False),
        sa.Column("min_event_id", BigId, nullable=False),
        sa.Column("max_event_id", BigId, nullable=False),
        sa.Column("n_desirable", sa.Integer(), nullable=False),
        sa.Column("n_undesirable", sa.Integer(), nullable=False),
        sa.Column("n_users", sa.Integer(), nullable=False),
        sa.Column("lambda_d", sa.Float(), nullable=False),
        sa.Column("lambda_u", sa.Float(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("reference_snapshot_id", sa.Integer(),
                  sa.ForeignKey("reference_snapshots.id", ondelete="RESTRICT")),
        sa.Column("step", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("total_steps", sa.Integer()),
        sa.Column("attempt", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("attempt_token", sa.String(64)),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False,
                  server_default=sa.text("false")),
        sa.Column("worker_host", sa.String(256)),
        sa.Column("heartbeat_at", UTCDateTime()),
        sa.Column("enqueued_at", UTCDateTime()),
        sa.Column("output_dir", sa.String(1024)),
        sa.Column("result", sa.JSON()),
        sa.Column("error", sa.Text()),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime()),
        sa.Column("finished_at", UTCDateTime()),
    )
    op.create_index("uq_training_jobs_active_line", "training_jobs", ["line"], unique=True,
                    postgresql_where=_ACTIVE, sqlite_where=_ACTIVE)
    op.create_index("ix_training_jobs_status", "training_jobs", ["status"])
    op.create_table(
        "job_metrics",
        sa.Column("job_id", sa.Integer(),
                  sa.ForeignKey("training_jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("step", sa.Integer(), primary_key=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("job_metrics")
    op.drop_index("ix_training_jobs_status", table_name="training_jobs")
    op.drop_index("uq_training_jobs_active_line", table_name="training_jobs")
    op.drop_table("training_jobs")
    op.drop_index("ix_reference_snapshots_line_id", table_name="reference_snapshots")
    op.drop_table("reference_snapshots")
    op.drop_table("model_lines")
    with op.batch_alter_table("feedback_events") as batch:
        batch.drop_column("split_bucket")
