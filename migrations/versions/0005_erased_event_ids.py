"""data rights: the hashed event ids user erasures deleted, so client retries do not store them again

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "erased_event_ids",
        sa.Column("event_id_hash", sa.String(64), primary_key=True),
        sa.Column("erasure_id", sa.Integer(), sa.ForeignKey("erasures.id", ondelete="CASCADE"),
                  nullable=False),
    )


def downgrade() -> None:
    op.drop_table("erased_event_ids")
